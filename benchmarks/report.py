#!/usr/bin/env python
"""Markdown summary and PNG plot from benchmarks/throughput.py JSON results.

    python benchmarks/report.py benchmarks/results/throughput_*.json   # writes NAME.md and NAME.png beside each
    python benchmarks/report.py RESULT.json --out-dir somewhere
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

COLUMNS = ("variant", "status", "batch", "samples/s", "step ms (p10-p90)", "model TFLOP/s", "exec TFLOP/s",
           "MFU (bf16 peak)", "MFU (measured mm)", "peak mem GiB", "speed-up")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "device"


def add_speedups(result: dict) -> None:
    """speedup = samples/s over the `reference` variant's (same run), when both succeeded."""
    ref = next((r for r in result["results"] if r["variant"] == "reference" and r["status"] == "ok"), None)
    for r in result["results"]:
        if ref is not None and r["status"] == "ok":
            r["speedup_vs_reference"] = r["samples_per_s"] / ref["samples_per_s"]
        else:
            r["speedup_vs_reference"] = None


def _fmt(v, spec: str, suffix: str = "") -> str:
    if v is None:
        return "-"
    if spec == ".1f" and abs(v) < 10:  # small numbers (CPU runs) keep 3 significant digits
        spec = ".3g"
    return format(v, spec) + suffix


def rows(result: dict):
    for r in result["results"]:
        ok = r["status"] == "ok"
        status = r["status"] if ok else f"{r['status']}: {r.get('error', '')[:80]}"
        yield [r["variant"], status, str(r.get("batch_size", "-")),
               _fmt(r.get("samples_per_s") if ok else None, ".1f"),
               (f"{r['step_ms']:.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f})" if ok and "step_ms_p10" in r
                else _fmt(r.get("step_ms") if ok else None, ".1f")),
               _fmt(r.get("model_tflops") if ok else None, ".1f"),
               _fmt(r.get("executed_tflops") if ok else None, ".1f"),
               _fmt(100 * r["mfu_vs_peak"] if ok and r.get("mfu_vs_peak") is not None else None, ".1f", "%"),
               _fmt(100 * r["mfu_vs_measured_matmul"] if ok else None, ".1f", "%"),
               _fmt(r.get("peak_memory_gib") if ok else None, ".2f"),
               _fmt(r.get("speedup_vs_reference") if ok else None, ".2f", "x")]


def markdown(result: dict) -> str:
    m = result["meta"]
    cap = result["captions"]
    fl = result["flops"]
    mm = result["matmul"]
    b = result["args"]["batch_size"]
    lines = [
        f"### Training throughput: M3AE-{result['preset']}, batch {b}"
        f"{' (largest batch that fits, per variant)' if result['args'].get('max_batch') else ''}",
        "",
        f"{m['device']} | driver {m.get('driver')} | torch {m['torch']} | triton {m.get('triton')} | "
        f"CUDA {m.get('cuda')} | commit `{str(m['git_commit'])[:12]}`{' (dirty)' if m.get('git_dirty') else ''} "
        f"| {m['date']}",
        "",
        f"Full training steps ({result['precision']}, AdamW), median of {result['args']['steps']} steps after "
        f"{result['args']['warmup']} warm-up. Captions: {cap['name']}, mean {cap['mean_tokens']} tokens"
        f"{'' if 'batch_mean_tokens' not in cap else ' (these batches: ' + str(cap['batch_mean_tokens']) + ')'}. "
        f"Model FLOPs (useful work, used for MFU): {fl['model_per_sample'] / 1e9:.4g} GFLOP/sample/step; the "
        f"reference formulation executes {fl['reference_per_sample'] / 1e9:.4g}. Measured {mm['dtype']} matmul "
        f"({mm['size']}^3): {mm['tflops']:.4g} TFLOP/s; bf16 dense peak: "
        f"{result['peak_bf16_tflops'] if result.get('peak_bf16_tflops') else 'unknown'} TFLOP/s.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    if result.get("note"):
        lines[1:1] = ["", f"**{result['note']}**"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows(result)]
    backends = [f"`{r['variant']}`: kernels {r.get('kernels')}, attention {r.get('attention')}, "
                f"packed {r.get('packed')}" for r in result["results"] if r.get("kernels")]
    if backends:
        lines += ["", "Backends used: " + "; ".join(backends) + "."]
    data = result.get("data") or {}
    if data.get("loader"):
        waits = ", ".join(f"`{r['variant']}` {r['data_wait_ms']:.1f} ms" for r in result["results"]
                          if r.get("data_wait_ms") is not None)
        lines += ["", f"Data: the WebDataset loader in the loop, decoder {data['loader']} ({data.get('threads')} "
                      f"threads), {data.get('source')}. Median host wait for the next batch per step: {waits}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> Optional[Path]:
    """Horizontal bars of samples/s per variant; failed variants are labelled. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    res = result["results"]
    names = [r["variant"] for r in res]
    values = [r.get("samples_per_s", 0.0) if r["status"] == "ok" else 0.0 for r in res]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(res) + 1.5))
    bars = ax.barh(names[::-1], values[::-1], color=["#4c72b0" if v else "#cccccc" for v in values[::-1]])
    top = max(values) if any(values) else 1.0
    for bar, r in zip(bars, res[::-1]):
        label = (f"{r['samples_per_s']:.4g}/s" + (f"  ({r['speedup_vs_reference']:.2f}x)"
                                                  if r.get("speedup_vs_reference") else "")
                 if r["status"] == "ok" else r["status"])
        ax.text(bar.get_width() + 0.01 * top, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=9)
    ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("training samples/s")
    ax.set_title(f"M3AE-{result['preset']}, batch {result['args']['batch_size']}, {result['meta']['device']}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="throughput JSON files")
    p.add_argument("--out-dir", default=None, help="default: beside each JSON")
    args = p.parse_args(argv)
    for f in args.results:
        f = Path(f)
        result = json.loads(f.read_text())
        add_speedups(result)
        out = Path(args.out_dir) if args.out_dir else f.parent
        out.mkdir(parents=True, exist_ok=True)
        md = markdown(result)
        (out / f"{f.stem}.md").write_text(md)
        png = plot(result, out / f"{f.stem}.png")
        print(md)
        print(f"wrote {out / (f.stem + '.md')}" + (f", {png}" if png else " (no PNG: matplotlib missing)"))


if __name__ == "__main__":
    main()
