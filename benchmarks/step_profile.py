#!/usr/bin/env python
"""Where the time of a training step goes: device time per kind of kernel, for throughput.py's variants.

    python benchmarks/step_profile.py                                  # large B=256 on a GPU, tiny on the CPU
    python benchmarks/step_profile.py --preset base --variants engine,engine+compile,reference+compile

Each variant (same model, weights and batches as benchmarks/throughput.py) is warmed up, its step timed
with CUDA events (median), then `--profile-steps` steps run under torch.profiler. Every GPU kernel, memcpy
and memset is put in one category by its name (CATEGORIES: matmul, attention, the engine's fused ops,
layer norm, compiled (inductor) kernels, other elementwise, reductions/softmax, optimizer, copies) and
reported as ms per step, % of the step and launches per step, with the largest single kernels. "GPU idle"
is the step time minus the device-busy time: when it is large the step waits on the host (Python,
launches, a sync) rather than on kernels. On the CPU the same table is built from the self time of
the profiler's aten ops (a smoke check of the script; the numbers mean nothing for a GPU).
Writes JSON and markdown (device, versions, commit, date) to --out-dir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import throughput  # noqa: E402  (Runner, VARIANTS, make_batches, environment; sets up sys.path for the repo)
from _profile import CATEGORIES, breakdown, device_events  # noqa: E402
from m3ae_engine import M3AE, M3AEConfig  # noqa: E402

def profile_variant(name: str, args, base: M3AEConfig, init_state: dict, device: torch.device, batches) -> dict:
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    res = {"variant": name, "status": "ok"}
    runner = None
    try:
        runner = throughput.Runner(name, base, init_state, device)
        res.update(runner.info)
        res.update(throughput.time_steps(runner, batches, args.steps, args.warmup, device))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for i in range(args.profile_steps):
                runner.step(batches[i % len(batches)])
            if cuda:
                torch.cuda.synchronize(device)
        res.update(breakdown(device_events(prof, cuda), args.profile_steps, res["step_ms"]))
    except Exception as e:  # noqa: BLE001 - a failing variant is a result, the run goes on
        throughput.record_failure(res, e)
        traceback.print_exc()
    finally:
        del runner
        throughput.release_variant(name, device)
    return res


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"### Where the step goes: M3AE-{result['preset']}, batch {result['batch_size']}", "",
             f"{m['device']} | driver {m.get('driver')} | torch {m['torch']} | triton {m.get('triton')} | "
             f"CUDA {m.get('cuda')} | commit `{str(m['git_commit'])[:12]}` | {m['date']}", "",
             f"Step: median of {result['steps']} CUDA-event-timed steps; breakdown: {result['profile_steps']} "
             "profiled steps, device time of every kernel / memcpy / memset by category. GPU idle = step - busy.",
             ""]
    for r in result["results"]:
        if r["status"] != "ok":
            lines += [f"**{r['variant']}**: {r['status']} {r.get('error', '')}", ""]
            continue
        lines += [f"**{r['variant']}**: step {r['step_ms']:.1f} ms, device busy {r['busy_ms']:.1f} ms, GPU idle "
                  f"{r['idle_ms']:.1f} ms ({100 * r['idle_ms'] / r['step_ms']:.0f}%), "
                  f"{r['launches_per_step']:.0f} launches per step", "",
                  "| category | ms / step | % of step | launches / step |", "|---|---:|---:|---:|"]
        lines += [f"| {c['category']} | {c['ms_per_step']:.2f} | {c['pct_of_step']:.1f}% | {c['launches_per_step']:.0f} |"
                  for c in r["categories"]]
        lines += ["", "| largest kernels | category | ms / step | launches / step |", "|---|---|---:|---:|"]
        lines += [f"| `{k['name'][:90]}` | {k['category']} | {k['ms_per_step']:.2f} | {k['launches_per_step']:.0f} |"
                  for k in r["top_kernels"]]
        lines.append("")
    return "\n".join(lines)


def save(stem: Path, result: dict) -> str:
    """Write <stem>.json and <stem>.md; returns the markdown."""
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    Path(f"{stem}.md").write_text(md)
    return md


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="large" if cuda else "tiny")
    p.add_argument("--batch-size", type=int, default=256 if cuda else 4)
    p.add_argument("--variants", default="engine,engine+compile")
    p.add_argument("--steps", type=int, default=8 if cuda else 2, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=0, help="skip variants not started after this many s")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(throughput.ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    names = throughput.parse_variants(args.variants)
    if args.steps < 1 or args.profile_steps < 1 or args.warmup < 0:
        raise SystemExit("error: --steps and --profile-steps must be >= 1, --warmup >= 0")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    base = M3AEConfig.from_preset(args.preset)
    torch.manual_seed(args.seed)
    init_state = {k: v.detach().clone() for k, v in M3AE(base).state_dict().items()}
    batches = throughput.make_batches(max(2, args.profile_steps), args.batch_size, base, device, False, args.seed)
    env = throughput.environment(device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"step_profile_{args.preset}_b{args.batch_size}_{throughput.report.slug(env['device'])}_"
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S')}")
    result = {"meta": env, "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
              "profile_steps": args.profile_steps, "categories": CATEGORIES, "results": []}
    for name in names:
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            result["results"].append({"variant": name, "status": "skipped",
                                      "error": f"--time-limit {args.time_limit:g}s reached"})
            continue
        print(f"[{name}] ...", flush=True)
        result["results"].append(profile_variant(name, args, base, init_state, device, batches))
        save(out_dir / stem, result)  # after every variant: a run cut short keeps what it measured
    md = save(out_dir / stem, result)
    print(md, flush=True)
    print(f"wrote {out_dir / stem}.json and .md", flush=True)
    result["json_path"] = str(out_dir / f"{stem}.json")
    return result


if __name__ == "__main__":
    main()
