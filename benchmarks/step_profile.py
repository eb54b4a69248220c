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
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import throughput  # noqa: E402  (Runner, VARIANTS, make_batches, environment; sets up sys.path for the repo)
from m3ae_engine import M3AE, M3AEConfig  # noqa: E402

# (category, pattern over the kernel / op name); the first match wins, so the specific ones come first
CATEGORIES = [
    ("engine fused ops", r"m3ae::|_gather_fwd_kernel|gather_rows_kernel|_cls_grad_partial|_unshuffle_fwd|"
                         r"_kind_grad_partial|_masked_mse_kernel|_ce_chunk_kernel|m3ae[_:]"),
    ("attention", r"flash|fmha|attention|sdpa|_efficient_attention|cudnn.*(mha|attn)"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|aten::(mm|addmm|bmm|matmul|linear|_addmm_activation)$"),
    ("compiled (inductor)", r"^triton_(poi|per|red|tem)_"),
    ("layer norm", r"layer_norm|layernorm|LayerNorm"),
    ("optimizer", r"multi_tensor|fused_adam|FusedAdam|_fused_adamw|adamw|lerp|addcdiv|addcmul"),
    ("reduction / softmax", r"reduce_kernel|softmax|Softmax|aten::(sum|mean|max|min|amax|logsumexp)$"),
    ("copy / cast / fill", r"[Mm]emcpy|[Mm]emset|copy_|CatArrayBatchedCopy|_to_copy|[Ff]ill|index|scatter|gather"),
    ("elementwise", r"elementwise|vectorized|unrolled|gelu|Gelu|aten::(add|mul|sub|div|where|gelu|neg|exp)"),
]
_COMPILED = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def categorize(name: str) -> str:
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return "other"


def device_events(prof, cuda: bool):
    """(name, microseconds) of every device event (CUDA), or every aten op's self time (CPU: nested ops
    are not counted twice)."""
    for e in prof.events():
        if cuda:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                yield e.name, e.time_range.elapsed_us()
        elif e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"):
            yield e.name, e.self_cpu_time_total


def breakdown(events, steps: int, step_ms: float, top: int = 12) -> dict:
    per_cat, per_name = {}, {}
    for name, us in events:
        c = per_cat.setdefault(categorize(name), [0.0, 0])
        c[0] += us
        c[1] += 1
        n = per_name.setdefault(name, [0.0, 0])
        n[0] += us
        n[1] += 1
    busy_ms = sum(v[0] for v in per_cat.values()) / steps / 1e3
    cats = [dict(category=k, ms_per_step=v[0] / steps / 1e3, pct_of_step=100 * v[0] / steps / 1e3 / step_ms,
                 launches_per_step=v[1] / steps) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1][0])]
    kernels = [dict(name=k[:120], category=categorize(k), ms_per_step=v[0] / steps / 1e3, launches_per_step=v[1] / steps)
               for k, v in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]]
    return dict(busy_ms=busy_ms, idle_ms=step_ms - busy_ms, launches_per_step=sum(c["launches_per_step"] for c in cats),
                categories=cats, top_kernels=kernels)


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
        res["status"] = "OOM" if throughput.is_oom(e) else "error"
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc()
    finally:
        del runner
        if throughput.VARIANTS[name].get("compile"):
            torch._dynamo.reset()
        throughput.free_memory(device)
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
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in throughput.VARIANTS]
    if unknown or not names:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {', '.join(throughput.VARIANTS)}")
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
    result = {"meta": env, "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
              "profile_steps": args.profile_steps, "categories": CATEGORIES, "results": []}
    for name in names:
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            result["results"].append({"variant": name, "status": "skipped",
                                      "error": f"--time-limit {args.time_limit:g}s reached"})
            continue
        print(f"[{name}] ...", flush=True)
        result["results"].append(profile_variant(name, args, base, init_state, device, batches))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"step_profile_{args.preset}_b{args.batch_size}_{throughput.report.slug(env['device'])}_"
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S')}")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out_dir / f"{stem}.md").write_text(md)
    print(md, flush=True)
    print(f"wrote {out_dir / stem}.json and .md", flush=True)
    result["json_path"] = str(out_dir / f"{stem}.json")
    return result


if __name__ == "__main__":
    main()
