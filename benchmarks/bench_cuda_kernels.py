"""Per-kernel benchmark of the CUDA C++ backend against torch (the references) and Triton.

For every op at the M3AE-large training size (B=256, D=1024, Li=256/Ki=64, Lt=64/Kt=16, decoder 512,
V=30522), fp32 and bf16: median time of the forward and of forward+backward (CUDA events, after
warm-up), achieved GB/s of the memory-bound kernels against the device-to-device copy bandwidth
measured in the same run, speed-up over torch and over Triton, and peak memory of the cross-entropy.

    python benchmarks/bench_cuda_kernels.py [--out benchmarks/results] [--reps 50] [--quick]

Writes cuda_kernels_<device>.json and .md under --out (device, torch/triton versions, commit).
"""
import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import git_commit  # noqa: E402

import torch  # noqa: E402

from m3ae_engine import ops  # noqa: E402
from m3ae_engine.masking import build_plan  # noqa: E402

DEV = "cuda"


def time_ms(fn, reps, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(reps):
    x = torch.empty(1 << 28, dtype=torch.uint8, device=DEV)  # 256 MiB
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), reps)
    return 2 * x.numel() / ms / 1e6  # GB/s, bytes read + written


def plan_large(b=256, li=256, ki=64, lt=64, kt=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lt // 4, lt + 1, (b,), generator=g)
    pad = (torch.arange(lt)[None, :] >= lengths[:, None]).to(torch.int32)
    return build_plan(b, li, ki, pad, lt, kt, generator=g, device="cpu").to(DEV)


def backends():
    out = {}
    for name, status in ops.available_backends().items():
        if status == "available":
            out[name] = ops.get_backend(name)
    return out


def bench_op(name, make, bytes_fwd, bytes_bwd, reps, bes):
    """make(backend) -> (forward fn, forward+backward fn)."""
    rows = []
    for bname, be in bes.items():
        fwd, fwdbwd = make(be)
        t_f = time_ms(fwd, reps)
        t_fb = time_ms(fwdbwd, reps)
        rows.append(dict(op=name, backend=bname, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                         fwd_GBps=bytes_fwd / t_f / 1e6 if bytes_fwd else None,
                         bwd_GBps=bytes_bwd / max(t_fb - t_f, 1e-6) / 1e6 if bytes_bwd else None))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="B=32 instead of 256")
    args = ap.parse_args()
    if ops.available_backends()["cuda"] != "available":
        print("CUDA backend unavailable:", ops.available_backends()["cuda"])
        return 2
    bes = backends()
    B = 32 if args.quick else 256
    plan = plan_large(B)
    D, Dd, V, P = 1024, 512, 30522, 768
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        torch.manual_seed(0)
        # ---- gather ----
        img = torch.randn(B, 256, D, device=DEV, dtype=dtype, requires_grad=True)
        txt = torch.randn(B, 64, D, device=DEV, dtype=dtype, requires_grad=True)
        cls = torch.randn(D, device=DEV, requires_grad=True)
        T = plan.enc_row_source.numel()
        gT = torch.randn(T, D, device=DEV, dtype=dtype)

        def make_gather(be):
            f = lambda: be.gather(img, txt, cls, plan.enc_row_source, plan.image_row_of, plan.text_row_of)  # noqa
            return f, lambda: torch.autograd.grad(f(), (img, txt, cls), gT)
        results += [dict(r, dtype=str(dtype)[6:]) for r in bench_op(
            "gather", make_gather, 2 * T * D * es, (T + B * 320) * D * es, args.reps, bes)]
        del img, txt, gT
        # ---- unshuffle ----
        vis = torch.randn(T, Dd, device=DEV, dtype=dtype, requires_grad=True)
        mt = torch.randn(2, Dd, device=DEV, requires_grad=True)
        ty = torch.randn(2, Dd, device=DEV, requires_grad=True)
        pos = torch.randn(1 + 256 + 64, Dd, device=DEV)
        R = plan.dec_row_visible.numel()
        gR = torch.randn(R, Dd, device=DEV, dtype=dtype)

        def make_unshuffle(be):
            f = lambda: be.unshuffle(vis, mt, ty, pos, plan.dec_row_visible, plan.dec_row_kind,  # noqa
                                     plan.dec_row_pos, plan.dec_row_of_visible)
            return f, lambda: torch.autograd.grad(f(), (vis, mt, ty), gR)
        results += [dict(r, dtype=str(dtype)[6:]) for r in bench_op(
            "unshuffle", make_unshuffle, (T + R) * Dd * es, (2 * R + T) * Dd * es, args.reps, bes)]
        del vis, gR
        # ---- masked_mse (uint8 image, norm_pix_loss on: MAE's setting) ----
        imgs = torch.randint(0, 256, (B, 3, 256, 256), device=DEV, dtype=torch.uint8)
        M = plan.image_patch_index.numel()
        pred = torch.randn(M, P, device=DEV, dtype=dtype, requires_grad=True)
        mean, std = (0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307)

        def make_mse(be):
            f = lambda: be.masked_mse(pred, imgs, plan.image_patch_index, plan.image_row_weight, 16, True,  # noqa
                                      mean, std)
            return f, lambda: torch.autograd.grad(f(), pred)
        results += [dict(r, dtype=str(dtype)[6:]) for r in bench_op(
            "masked_mse", make_mse, M * P * (es + 1), M * P * (2 * es + 1), args.reps, bes)]
        del pred, imgs
        # ---- masked linear cross-entropy ----
        N = plan.text_pred_rows.numel()
        h = torch.randn(N, Dd, device=DEV, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, Dd, device=DEV) * 0.02).requires_grad_(True)
        bias = torch.zeros(V, device=DEV, requires_grad=True)
        tgt = torch.randint(0, V, (N,), device=DEV)
        rw = plan.text_row_weight

        def make_lce(be):
            f = lambda: ops.linear_cross_entropy(h, w, bias, tgt, rw, backend=be.name)[0]  # noqa: E731  (dtype handling of ops)
            return f, lambda: torch.autograd.grad(f(), (h, w, bias))
        lce_rows = bench_op("linear_cross_entropy", make_lce, None, None, max(5, args.reps // 5), bes)
        for r in lce_rows:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd, fb = make_lce(bes[r["backend"]])
            fb()
            torch.cuda.synchronize()
            r["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        results += [dict(r, dtype=str(dtype)[6:]) for r in lce_rows]
        del h, w, bias
    bw = copy_bandwidth(args.reps)
    by = {}
    for r in results:
        by.setdefault((r["op"], r["dtype"]), {})[r["backend"]] = r
    for (op, dt), d in by.items():
        for r in d.values():
            for other in ("torch", "triton"):
                if other in d and r["backend"] != other:
                    r[f"speedup_fwd_bwd_vs_{other}"] = d[other]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            if r.get("fwd_GBps"):
                r["fwd_frac_of_copy_bw"] = r["fwd_GBps"] / bw
    commit = git_commit()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda, python=platform.python_version(), commit=commit, batch=B,
                copy_bandwidth_GBps=bw, reps=args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    (out / f"cuda_kernels_{tag}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    lines = [f"# CUDA kernels vs torch / Triton on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, commit {commit}, B={B}, "
             f"median of {args.reps} runs (CUDA events). Copy bandwidth (read+write): {bw:.0f} GB/s.", "",
             "| op | dtype | backend | fwd ms | fwd+bwd ms | fwd GB/s (% copy) | x torch | x triton | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        gb = f"{r['fwd_GBps']:.0f} ({100 * r['fwd_frac_of_copy_bw']:.0f}%)" if r.get("fwd_GBps") else "-"
        xt = f"{r['speedup_fwd_bwd_vs_torch']:.2f}" if "speedup_fwd_bwd_vs_torch" in r else "-"
        xr = f"{r['speedup_fwd_bwd_vs_triton']:.2f}" if "speedup_fwd_bwd_vs_triton" in r else "-"
        pk = f"{r['peak_extra_MiB']:.0f}" if "peak_extra_MiB" in r else "-"
        lines.append(f"| {r['op']} | {r['dtype']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{gb} | {xt} | {xr} | {pk} |")
    (out / f"cuda_kernels_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
