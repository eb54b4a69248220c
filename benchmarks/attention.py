"""Benchmark the packed (varlen) attention backends at M3AE-large shapes.

    python benchmarks/attention.py --out benchmarks/results/attention_h100.json

Encoder: T = sum of B lengths in [65, 81] (CLS + 64 kept patches + kept non-padded text), H 16, Dh 64.
Decoder: T = sum of B lengths in [262, 321] (CLS + 256 patches + non-padded text), H 16, Dh 32.
Caption lengths ~ U[5, 64] tokens, B = 256, bf16. Forward and forward+backward medians
(triton.testing.do_bench, else CUDA events) for each available backend, for the exact layout
(plan built on the CPU) and the capacity layout (plan built on the GPU: B * max_seqlen rows with a
filler tail). Prints a table, the recommended AUTO_ORDER, and writes everything as JSON to --out.
`--device cpu` runs a small smoke test of the script itself (math and sdpa only).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment, error_text, median_ms  # noqa: E402

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from m3ae_engine.model import attention as A  # noqa: E402

STACKS = {"encoder": dict(heads=16, head_dim=64), "decoder": dict(heads=16, head_dim=32)}


def realistic_lengths(stack: str, batch: int, gen: torch.Generator):
    """(per-sample lengths, static max_seqlen) of M3AE at 256 px, 64 text tokens, 75% masking."""
    caption = torch.randint(5, 65, (batch,), generator=gen)
    if stack == "decoder":
        return (1 + 256 + caption).tolist(), 1 + 256 + 64
    kept = torch.rand(batch, 64, generator=gen).argsort(1)[:, :16]  # 16 kept of 64 text positions
    n_text = (kept < caption[:, None]).sum(1)  # kept positions that are not padding
    return (1 + 64 + n_text).tolist(), 1 + 64 + 16


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backends", default="", help="comma-separated subset (default: every available one)")
    p.add_argument("--layouts", default="exact,capacity", help="exact, capacity or both")
    p.add_argument("--stacks", default="encoder,decoder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench time budget per measurement")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible; use --device cpu for a smoke test")
    dtype = getattr(torch, args.dtype)
    availability = A.available_backends(device)
    names = [n.strip() for n in args.backends.split(",") if n.strip()] or list(A.BACKENDS)
    unknown = [n for n in names if n not in A.BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; known: {', '.join(A.BACKENDS)}")
    runnable = [n for n in names if availability[n].startswith("available")]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    stacks = [x.strip() for x in args.stacks.split(",") if x.strip()]
    for x in layouts:
        if x not in ("exact", "capacity"):
            p.error(f"unknown layout {x!r}; use exact and/or capacity")
    for x in stacks:
        if x not in STACKS:
            p.error(f"unknown stack {x!r}; use encoder and/or decoder")

    gen = torch.Generator().manual_seed(0)
    results = []
    for stack in stacks:
        heads, dh = STACKS[stack]["heads"], STACKS[stack]["head_dim"]
        lengths, max_seqlen = realistic_lengths(stack, args.batch, gen)
        n = sum(lengths)
        flops_fwd = 4 * heads * dh * sum(x * x for x in lengths)  # QK^T and PV, 2 FLOPs per MAC
        for layout in layouts:
            rows = n if layout == "exact" else args.batch * max_seqlen
            cu = torch.zeros(args.batch + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
            cu = cu.to(device)
            qkv = torch.randn(rows, 3, heads, dh, generator=gen).to(device, dtype).requires_grad_(True)
            grad = torch.randn(rows, heads, dh, generator=gen).to(device, dtype)
            ref = A.varlen_attention_qkvpacked(qkv.detach().float(), cu, max_seqlen, "math")  # fp32 oracle
            for name in runnable:
                row = dict(stack=stack, layout=layout, backend=name, batch=args.batch, rows=rows, tokens=n,
                           heads=heads, head_dim=dh, max_seqlen=max_seqlen, dtype=args.dtype)
                call = dict(backend=name, exact=(layout == "exact"))
                try:
                    with torch.no_grad():
                        out = A.varlen_attention_qkvpacked(qkv, cu, max_seqlen, **call)
                    row["max_abs_err_vs_fp32_math"] = (out.float() - ref)[:n].abs().max().item()

                    def fwd():
                        with torch.no_grad():
                            A.varlen_attention_qkvpacked(qkv, cu, max_seqlen, **call)

                    def fwd_bwd():
                        qkv.grad = None
                        A.varlen_attention_qkvpacked(qkv, cu, max_seqlen, **call).backward(grad)

                    row["fwd_ms"] = median_ms(fwd, device, rep_ms=args.rep_ms)
                    row["fwd_bwd_ms"] = median_ms(fwd_bwd, device, rep_ms=args.rep_ms)
                    row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
                    row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd_ms"] / 1e9  # bwd = 2.5 x fwd
                except Exception as e:  # a backend that refuses these shapes is a result, not a crash
                    row["error"] = error_text(e)
                results.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    # recommendation: total forward+backward time over every measured (stack, layout), fastest first
    totals = {}
    for name in runnable:
        rows_ = [r for r in results if r["backend"] == name]
        if rows_ and all("fwd_bwd_ms" in r for r in rows_):
            totals[name] = sum(r["fwd_bwd_ms"] for r in rows_)
    measured = sorted((n for n in totals if n != "math"), key=totals.get)
    recommended = tuple(measured + [n for n in A.AUTO_ORDER if n not in measured and n != "math"] + ["math"])

    hdr = f"{'stack':8} {'layout':8} {'backend':15} {'fwd ms':>9} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'max err':>9}"
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
          f"  torch {torch.__version__}  dtype {args.dtype}  B {args.batch}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "error" in r:
            print(f"{r['stack']:8} {r['layout']:8} {r['backend']:15} FAILED: {r['error'][:60]}")
        else:
            print(f"{r['stack']:8} {r['layout']:8} {r['backend']:15} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:11.3f} "
                  f"{r['fwd_bwd_tflops']:8.1f} {r['max_abs_err_vs_fp32_math']:9.2e}")
    for name, why in availability.items():
        if name in names and not why.startswith("available"):
            print(f"{'':8} {'':8} {name:15} not run: {why}")
    print(f"\nrecommended m3ae_engine.model.attention.AUTO_ORDER = {recommended!r}")
    print(f"(current AUTO_ORDER = {A.AUTO_ORDER!r})")

    if args.out:
        payload = dict(benchmark="attention", meta=environment(device, ("flash_attn", "flash_attn_interface", "xformers")),
                       args=vars(args),
                       availability=availability, auto_order=list(A.AUTO_ORDER),
                       recommended_auto_order=list(recommended), totals_fwd_bwd_ms=totals, results=results)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
