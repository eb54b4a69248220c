"""Per-kernel GPU benchmark of the four engine ops at M3AE shapes, for every available backend.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json
    python benchmarks/kernels.py --presets large --dtypes bf16 --batch 256 --backends torch,triton,cuda
    python benchmarks/kernels.py --smoke          # CPU, Triton interpreter: checks the script only

For each op x preset x dtype x backend, forward (no grad) and forward+backward, three clocks:
- device ms: the op's launches captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph,
  median): GPU time without the host's launch cost. The figure the kernel floors are compared with
  (achieved GB/s of the op's minimal traffic against the measured device-to-device copy rate).
- eager ms: one call as user code issues it (triton.testing.do_bench, median, L2 flushed between calls):
  includes the host-side launch latency the GPU waits on when the op runs alone.
- host us: CPU time to issue one call (20 calls back to back, no sync inside): Python, the dispatcher,
  input checks and the kernel launches.
Plus the kernels one forward+backward launches (torch.profiler: device us and launches per call), the
speed-up over the torch reference (device time), the peak extra memory of one forward+backward, and
for the linear cross-entropy the device time of its three matmuls alone (its FLOP floor measured with
cuBLAS here). Prints a table; writes JSON and a markdown table (device, driver, versions, commit, date)
to --out (default: $OUT/kernels.json when $OUT is set, else benchmarks/results/kernels.json).
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the Triton interpreter must be chosen before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, error_text, matmul_tflops, median_ms  # noqa: E402
from _profile import breakdown, device_events  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from m3ae_engine import ops  # noqa: E402
from m3ae_engine.model.config import CC12M_MEAN, CC12M_STD, ENCODER_PRESETS  # noqa: E402
from m3ae_engine.model.masking import build_plan  # noqa: E402

DEV = "cuda"  # --smoke switches to the CPU (Triton interpreter) to check the script itself
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("gather", "unshuffle", "masked_mse", "linear_cross_entropy")


def shapes(preset: str, batch: int) -> dict:
    if preset == "smoke":
        return dict(B=batch, D=16, Dd=8, image=16, patch=4, Li=16, Ki=4, Lt=8, Kt=2, V=50)
    return dict(B=batch, D=ENCODER_PRESETS[preset]["emb_dim"], Dd=512, image=256, patch=16, Li=256, Ki=64,
                Lt=64, Kt=16, V=30522)


def make_plan(s: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # caption lengths 16..64 tokens (CC12M-like); the plan is built on the CPU (exact packed sizes)
    lengths = torch.randint(s["Lt"] // 4, s["Lt"] + 1, (s["B"],), generator=gen)
    pad = (torch.arange(s["Lt"])[None, :] >= lengths[:, None]).float()
    return build_plan(s["B"], s["Li"], s["Ki"], pad, s["Lt"], s["Kt"], generator=gen).to(DEV)


# ----------------------------------------------------------------------------------------------
# clocks
# ----------------------------------------------------------------------------------------------
def eager_ms(fn: Callable) -> float:
    """One call as user code issues it: median of do_bench (L2 flushed between calls); CPU: wall clock."""
    return median_ms(fn, DEV)


def device_ms(fn: Callable) -> float:
    """GPU time of fn's launches without the host: captured in a CUDA graph, replayed (median)."""
    from triton.testing import do_bench_cudagraph
    gc.disable()  # a collection during capture can free tensors the graph uses (triton >= 3.7 does this itself)
    try:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    finally:
        gc.enable()


def host_us(fn: Callable, calls: int = 20) -> float:
    """CPU microseconds to issue one call (the GPU runs behind; no sync inside the timed calls)."""
    fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    if DEV == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def kernel_breakdown(fn: Callable, iters: int = 5, top: int = 8) -> dict:
    """The device work of one call from torch.profiler: kernels/memsets/memcpys, by category and the largest."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    b = breakdown(device_events(prof, cuda=True), iters, step_ms=float("nan"), top=top)
    return {"device_us_per_call": 1e3 * b["busy_ms"], "launches_per_call": b["launches_per_step"],
            "top": [dict(name=k["name"], category=k["category"], us_per_call=1e3 * k["ms_per_step"],
                         launches_per_call=k["launches_per_step"]) for k in b["top_kernels"]]}


def copy_bandwidth() -> float:
    """Device-to-device copy rate in GB/s (read + write bytes), 1 GiB buffers (CPU smoke: 256 KiB)."""
    src = torch.empty(1 << (28 if DEV == "cuda" else 16), dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    ms = eager_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def build_case(op: str, s: dict, plan, dtype, gen):
    """(leaves, fn(backend) -> output to differentiate, bytes_fwd, bytes_fwd_bwd, flops, matmul_fn)."""
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=DEV).to(dtype).requires_grad_()  # noqa: E731
    el = torch.tensor([], dtype=dtype).element_size()
    B, D, Dd = s["B"], s["D"], s["Dd"]
    if op == "gather":
        img, txt, cls = rnd(B, s["Li"], D), rnd(B, s["Lt"], D), rnd(D)
        t = plan.enc.rows
        fn = lambda be: ops.gather(img, txt, cls, plan.enc_row_source, plan.image_row_of, plan.text_row_of,  # noqa
                                   backend=be)
        fwd = 2 * t * D * el + 4 * t
        bwd = t * D * el + (B * s["Li"] + B * s["Lt"]) * D * el + 4 * (B * s["Li"] + B * s["Lt"])
        return [img, txt, cls], fn, fwd, fwd + bwd, 0, None
    if op == "unshuffle":
        vis, mt, te = rnd(plan.enc.rows, Dd), rnd(2, Dd), rnd(2, Dd)
        pos = torch.randn(s["Li"] + s["Lt"], Dd, generator=gen, device=DEV).to(dtype)
        r, t = plan.dec.rows, plan.enc.rows
        fn = lambda be: ops.unshuffle_rows(vis, mt, te, pos, plan.dec_row_visible, plan.dec_row_kind,  # noqa
                                           plan.dec_row_pos, plan.dec_row_of_visible, backend=be)
        fwd = (t + r + pos.shape[0]) * Dd * el + 12 * r
        bwd = (r + 2 * t) * Dd * el + 12 * r
        return [vis, mt, te], fn, fwd, fwd + bwd, 0, None
    if op == "masked_mse":
        m = plan.image_patch_index.numel()
        p = s["patch"] ** 2 * 3
        imgs = torch.randint(0, 256, (B, 3, s["image"], s["image"]), generator=gen, device=DEV,
                             dtype=torch.uint8)
        pred = rnd(m, p)
        fn = lambda be: ops.masked_mse(pred, imgs, plan.image_patch_index, plan.image_row_weight, s["patch"],  # noqa
                                       True, CC12M_MEAN, CC12M_STD, backend=be)
        fwd = m * p * (el + 1)
        return [pred], fn, fwd, fwd + m * p * (2 * el + 1), 0, None
    if op == "linear_cross_entropy":
        n = plan.text_pred_rows.numel()
        h, w, b = rnd(n, Dd), (torch.randn(s["V"], Dd, generator=gen, device=DEV) / Dd ** 0.5).to(dtype), rnd(s["V"])
        w.requires_grad_()
        tgt = torch.randint(0, s["V"], (n,), generator=gen, device=DEV)
        fn = lambda be: ops.linear_cross_entropy(h, w, b, tgt, plan.text_row_weight, backend=be)[0]  # noqa
        g_logits = torch.randn(n, s["V"], generator=gen, device=DEV).to(dtype)

        def matmuls():  # the FLOP floor: logits, grad_hidden, grad_weight
            torch.mm(h.detach(), w.detach().t())
            torch.mm(g_logits, w.detach())
            torch.mm(g_logits.t(), h.detach())

        flops = 2 * n * Dd * s["V"]
        return [h, w, b], fn, (n * Dd + s["V"] * Dd) * el, (2 * n * Dd + 2 * s["V"] * Dd) * el, flops, matmuls
    raise ValueError(op)


def _try(res: dict, key: str, measure: Callable) -> None:
    """res[key] = measure(), or None and the error under key + '_error' (one failing clock keeps the row)."""
    try:
        res[key] = measure()
    except Exception as e:  # noqa: BLE001
        res[key] = None
        res[key + "_error"] = error_text(e, 200)


def run_case(op, s, plan, dtype, backend, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    leaves, fn, bytes_fwd, bytes_all, flops, matmuls = build_case(op, s, plan, dtype, gen)
    with torch.no_grad():
        out = fn(backend)
    grad_out = torch.randn_like(out) if out.dim() else torch.ones_like(out)

    def fwd():
        with torch.no_grad():
            fn(backend)

    def fwd_bwd():
        torch.autograd.grad(fn(backend), leaves, grad_out)

    res = dict(op=op, backend=backend, bytes_fwd=bytes_fwd, bytes_fwd_bwd=bytes_all,
               fwd_eager_ms=eager_ms(fwd), fwd_bwd_eager_ms=eager_ms(fwd_bwd),
               host_us_fwd=host_us(fwd), host_us_fwd_bwd=host_us(fwd_bwd))
    if DEV == "cuda":
        _try(res, "fwd_device_ms", lambda: device_ms(fwd))
        _try(res, "fwd_bwd_device_ms", lambda: device_ms(fwd_bwd))
        _try(res, "kernels_fwd_bwd", lambda: kernel_breakdown(fwd_bwd))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        res["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    # the figure compared with the floors: device time where the graph capture worked
    res["fwd_ms"] = res.get("fwd_device_ms") or res["fwd_eager_ms"]
    res["fwd_bwd_ms"] = res.get("fwd_bwd_device_ms") or res["fwd_bwd_eager_ms"]
    res["clock"] = "device" if res.get("fwd_bwd_device_ms") else "eager"
    res["fwd_GBps"] = bytes_fwd / res["fwd_ms"] / 1e6
    res["fwd_bwd_GBps"] = bytes_all / res["fwd_bwd_ms"] / 1e6
    if flops:
        res["flops_fwd_bwd"] = 3 * flops
        res["fwd_bwd_TFLOPs"] = 3 * flops / res["fwd_bwd_ms"] / 1e9
        res["matmuls_eager_ms"] = eager_ms(matmuls)
        if DEV == "cuda":
            _try(res, "matmuls_device_ms", lambda: device_ms(matmuls))
        res["matmuls_ms"] = res.get("matmuls_device_ms") or res["matmuls_eager_ms"]
        res["time_over_matmuls"] = res["fwd_bwd_ms"] / res["matmuls_ms"]
    return res


def _speedup(torch_row: Optional[dict], row: dict) -> Optional[float]:
    """torch time / this time on the same clock: device time when both were captured, else eager."""
    if torch_row is None:
        return None
    if torch_row.get("fwd_bwd_device_ms") and row.get("fwd_bwd_device_ms"):
        return torch_row["fwd_bwd_device_ms"] / row["fwd_bwd_device_ms"]
    return torch_row["fwd_bwd_eager_ms"] / row["fwd_bwd_eager_ms"]


def markdown(meta: dict, rows: list) -> str:
    lines = [f"# Kernels: {meta['device']}", "",
             f"driver {meta.get('driver')}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
             f"Python {meta['python']}, commit `{meta['git_commit']}`, {meta['date']}, batch {meta['batch']}. "
             f"Copy {meta['copy_GBps']:.0f} GB/s (read + write), matmul {meta['matmul_TFLOPs']} TFLOP/s.", "",
             "Device ms: CUDA-graph replay (no host launch cost); eager ms: one call issued from Python, "
             "L2 flushed; host us: CPU time to issue one call. % copy: the op's minimal bytes / device "
             "time against the copy rate. x torch: speed-up over the torch reference (device time, or eager "
             "where the torch reference could not be captured).", "",
             "| op | preset | dtype | backend | fwd ms | fwd+bwd ms | % copy (f+b) | x torch | eager f+b ms "
             "| host us f+b | launches f+b | peak MiB | matmuls ms (ratio) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['preset']} | {r['dtype']} | {r['backend']} | error: {r['error'][:80]} "
                         "| | | | | | | | |")
            continue
        k = r.get("kernels_fwd_bwd") or {}
        mm = (f"{r['matmuls_ms']:.3f} ({r['time_over_matmuls']:.2f}x)" if "matmuls_ms" in r else "-")
        sp = f"{r['speedup_fwd_bwd']:.2f}x" if r.get("speedup_fwd_bwd") else "-"
        lines.append(f"| {r['op']} | {r['preset']} | {r['dtype']} | {r['backend']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_bwd_ms']:.3f} | {r['pct_copy_bw']:.0f}% | {sp} | {r['fwd_bwd_eager_ms']:.3f} | "
                     f"{r['host_us_fwd_bwd']:.0f} | {k.get('launches_per_call', float('nan')):.0f} | "
                     f"{r.get('peak_extra_MiB', float('nan')):.0f} | {mm} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="base,large")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backends", default="torch,triton,cuda", help="those unavailable are skipped")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter): checks "
                    "the script, measures nothing meaningful")
    args = ap.parse_args(argv)
    global DEV
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 before triton is imported: run it as a script")
        DEV = "cpu"
        args.presets, args.batch = "smoke", min(args.batch, 3)
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --smoke to check the script on the CPU)")
    unknown = [o for o in args.ops.split(",") if o not in OPS]
    if unknown:
        sys.exit(f"unknown op(s) {unknown}; choose from {', '.join(OPS)}")

    avail = ops.available_backends()
    backends = [b for b in args.backends.split(",") if avail.get(b) == "available"]
    skipped = {b: avail.get(b, "unknown backend") for b in args.backends.split(",") if b not in backends}
    env = environment(torch.device(DEV))
    bw = copy_bandwidth()
    meta = dict(env, batch=args.batch, copy_GBps=bw, skipped_backends=skipped,
                matmul_TFLOPs={d: round(matmul_tflops(DEV, DTYPES[d])["tflops"], 1) for d in args.dtypes.split(",")})
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  CUDA {meta['cuda']}  "
          f"commit {meta['git_commit'][:10]}  copy {bw:.0f} GB/s  matmul {meta['matmul_TFLOPs']}")
    if skipped:
        print(f"# skipped backends: {skipped}")
    out = Path(args.out or (os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT")
                            else str(ROOT / "benchmarks" / "results" / "kernels.json")))
    rows = []
    hdr = (f"{'op':<22}{'preset':<7}{'dtype':<6}{'backend':<8}{'fwd ms':>9}{'f+b ms':>9}{'%copy':>7}{'x torch':>9}"
           f"{'eager':>9}{'host us':>9}{'peak MiB':>10}{'mm ratio':>9}")
    print(hdr + "   (ms: device time, CUDA graph; eager: f+b ms issued from Python)")
    for preset in args.presets.split(","):
        s = shapes(preset, args.batch)
        plan = make_plan(s)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            base_ms = {}
            for op in args.ops.split(","):
                for be in backends:
                    try:
                        r = run_case(op, s, plan, dtype, be)
                    except Exception as e:  # keep going: one failing case must not lose the table
                        r = dict(op=op, backend=be, error=error_text(e))
                        traceback.print_exc()
                    r.update(preset=preset, dtype=dname, shapes=s)
                    if DEV == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(r)
                    if "error" in r:
                        print(f"{op:<22}{preset:<7}{dname:<6}{be:<8} ERROR {r['error'][:80]}")
                        continue
                    if be == "torch":
                        base_ms[op] = r
                    r["speedup_fwd_bwd"] = _speedup(base_ms.get(op), r)
                    r["pct_copy_bw"] = 100 * r["fwd_bwd_GBps"] / bw
                    sp = f"{r['speedup_fwd_bwd']:.2f}x" if r["speedup_fwd_bwd"] else "-"
                    mm = f"{r['time_over_matmuls']:.2f}x" if "time_over_matmuls" in r else "-"
                    print(f"{op:<22}{preset:<7}{dname:<6}{be:<8}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>9.3f}"
                          f"{r['pct_copy_bw']:>6.0f}%{sp:>9}{r['fwd_bwd_eager_ms']:>9.3f}{r['host_us_fwd_bwd']:>9.0f}"
                          f"{r.get('peak_extra_MiB', float('nan')):>10.0f}{mm:>9}")
                    for key in ("fwd_device_ms_error", "fwd_bwd_device_ms_error", "kernels_fwd_bwd_error",
                                "matmuls_device_ms_error"):
                        if key in r:
                            print(f"# {op} {be} {key}: {r[key]}")
                    save(out, meta, rows)  # after every case: a run cut short keeps what it measured
    save(out, meta, rows)
    print(f"# wrote {out} and {out.with_suffix('.md')}")
    return rows


def save(out: Path, meta: dict, rows: list) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(meta, rows))


if __name__ == "__main__":
    main()
