"""Per-kernel GPU benchmark of the four engine ops at M3AE shapes, for every available backend.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json
    python benchmarks/kernels.py --presets large --dtypes bf16 --batch 256 --backends torch,triton

For each op x preset x dtype x backend: forward time (no grad), forward+backward time
(triton.testing.do_bench medians), achieved GB/s of the op's minimal traffic against the measured
device-to-device copy bandwidth, speed-up over the torch reference, and peak extra memory of one
forward+backward. For the linear cross-entropy also the time of its three matmuls alone (the FLOP
floor measured with cuBLAS on this device). Prints a table and writes JSON (device, versions,
commit, date) to --out (default: $OUT/kernels.json when $OUT is set, else benchmarks/results/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import git_commit  # noqa: E402

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from m3ae_engine import ops  # noqa: E402
from m3ae_engine.config import CC12M_MEAN, CC12M_STD, ENCODER_PRESETS  # noqa: E402
from m3ae_engine.masking import build_plan  # noqa: E402

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


def bench_ms(fn, dev_bench):
    return dev_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy rate in GB/s (read + write bytes), 1 GiB buffers."""
    src = torch.empty(1 << (28 if DEV == "cuda" else 16), dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), do_bench)
    return 2 * src.numel() * 4 / ms / 1e6


def matmul_rate(do_bench, dtype) -> float:
    n = 8192 if DEV == "cuda" else 64
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    ms = bench_ms(lambda: a @ b, do_bench)
    return 2 * n ** 3 / ms / 1e9  # TFLOP/s


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


def run_case(op, s, plan, dtype, backend, do_bench, seed=0):
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

    t_fwd = bench_ms(fwd, do_bench)
    t_all = bench_ms(fwd_bwd, do_bench)
    peak = float("nan")
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    res = dict(op=op, backend=backend, fwd_ms=t_fwd, fwd_bwd_ms=t_all, bytes_fwd=bytes_fwd, bytes_fwd_bwd=bytes_all,
               fwd_GBps=bytes_fwd / t_fwd / 1e6, fwd_bwd_GBps=bytes_all / t_all / 1e6, peak_extra_MiB=peak)
    if flops:
        res["flops_fwd_bwd"] = 3 * flops
        res["fwd_bwd_TFLOPs"] = 3 * flops / t_all / 1e9
        res["matmuls_only_ms"] = bench_ms(matmuls, do_bench)
    return res


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
        DEV = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.presets, args.batch = "smoke", min(args.batch, 3)
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --smoke to check the script on the CPU)")
    import triton
    if args.smoke:
        import time

        def do_bench(fn, warmup=0, rep=0, return_mode="median"):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        from triton.testing import do_bench

    avail = ops.available_backends()
    backends = [b for b in args.backends.split(",") if avail.get(b) == "available"]
    skipped = {b: avail.get(b, "unknown backend") for b in args.backends.split(",") if b not in backends}
    bw = copy_bandwidth(do_bench)
    meta = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                batch=args.batch, copy_GBps=bw, skipped_backends=skipped)
    meta["matmul_TFLOPs"] = {d: matmul_rate(do_bench, DTYPES[d]) for d in args.dtypes.split(",")}
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  CUDA {meta['cuda']}  "
          f"commit {meta['commit'][:10]}  copy {bw:.0f} GB/s  matmul {meta['matmul_TFLOPs']}")
    if skipped:
        print(f"# skipped backends: {skipped}")
    rows = []
    hdr = (f"{'op':<22}{'preset':<7}{'dtype':<6}{'backend':<8}{'fwd ms':>9}{'f+b ms':>9}{'f GB/s':>9}"
           f"{'f+b GB/s':>10}{'%copy':>7}{'speedup':>9}{'peak MiB':>10}{'mm ms':>8}")
    print(hdr)
    for preset in args.presets.split(","):
        s = shapes(preset, args.batch)
        plan = make_plan(s)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            base_ms = {}
            for op in args.ops.split(","):
                for be in backends:
                    try:
                        r = run_case(op, s, plan, dtype, be, do_bench)
                    except Exception as e:  # keep going: one failing case must not lose the table
                        r = dict(op=op, backend=be, error=f"{type(e).__name__}: {e}")
                        traceback.print_exc()
                    r.update(preset=preset, dtype=dname, shapes=s)
                    if DEV == "cuda":
                        torch.cuda.empty_cache()
                    if "error" in r:
                        print(f"{op:<22}{preset:<7}{dname:<6}{be:<8} ERROR {r['error'][:80]}")
                        rows.append(r)
                        continue
                    if be == "torch":
                        base_ms[op] = r["fwd_bwd_ms"]
                    r["speedup_fwd_bwd"] = base_ms[op] / r["fwd_bwd_ms"] if op in base_ms else None
                    r["pct_copy_bw"] = 100 * r["fwd_bwd_GBps"] / bw
                    rows.append(r)
                    sp = f"{r['speedup_fwd_bwd']:.2f}x" if r["speedup_fwd_bwd"] else "-"
                    mm = f"{r['matmuls_only_ms']:.3f}" if "matmuls_only_ms" in r else "-"
                    print(f"{op:<22}{preset:<7}{dname:<6}{be:<8}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>9.3f}"
                          f"{r['fwd_GBps']:>9.0f}{r['fwd_bwd_GBps']:>10.0f}{r['pct_copy_bw']:>6.0f}%{sp:>9}"
                          f"{r['peak_extra_MiB']:>10.0f}{mm:>8}")
    out = args.out or (os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT")
                       else str(ROOT / "benchmarks" / "results" / "kernels.json"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
