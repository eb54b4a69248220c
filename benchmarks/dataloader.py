#!/usr/bin/env python
"""Loader throughput: images/s of read + decode + RandomResizedCrop/flip + tokenise for each available
loader (dali, nvjpeg, cpu) on the device, with the CPU threads each uses.

Makes its own WebDataset shards of real JPEGs (synthetic scenes, 256-512 px, varied aspect ratios)
in a temp folder, then times `--batches` batches after `--warmup` batches per loader.

    python benchmarks/dataloader.py --out results.json            # every available decoder
    python benchmarks/dataloader.py --decoders cpu --threads 4
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

import torch  # noqa: E402

from m3ae_engine.data import build_loader, dali_available, nvjpeg_available  # noqa: E402
from m3ae_engine.data.shards import ShardWriter  # noqa: E402


def _make(args):
    from m3ae_engine.data.testdata import jpeg_bytes
    i, seed, lo, hi = args
    import numpy as np
    rng = np.random.default_rng([seed, i])
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    return jpeg_bytes(i, seed, (w, h), quality=90)


def make_shards(out_dir: str, num_images: int, per_shard: int, lo: int, hi: int, seed: int = 0):
    w = ShardWriter(out_dir, per_shard)
    # fork after CUDA is initialised is unsafe (throughput.py makes its shards after measuring the GPU)
    ctx = multiprocessing.get_context("spawn") if torch.cuda.is_initialized() else None
    with ProcessPoolExecutor(max(1, min(16, os.cpu_count() or 1)), mp_context=ctx) as ex:
        for i, (data, cap) in enumerate(ex.map(_make, [(i, seed, lo, hi) for i in range(num_images)],
                                                chunksize=16)):
            w.write(f"{i:09d}", {"jpg": data, "txt": cap.encode()})
    return w.close()


def bench(paths, decoder, device, args):
    kw = dict(decoder=decoder, device=device, seed=0)
    if decoder == "cpu":
        kw["num_workers"] = args.threads
    else:
        kw["num_threads"] = args.threads
    if decoder == "dali":
        kw["shuffle_buffer"] = min(1024, args.images)
    loader = build_loader(paths, args.batch_size, args.size, 64, **kw)
    it = iter(loader)
    sync = (lambda: torch.cuda.synchronize()) if torch.device(device).type == "cuda" else (lambda: None)
    t_first = time.perf_counter()
    for _ in range(args.warmup):
        b = next(it)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        b = next(it)
    sync()
    dt = time.perf_counter() - t0
    assert b["image"].shape == (args.batch_size, 3, args.size, args.size)
    return {"decoder": loader.decoder, "device": str(b["image"].device), "threads": loader.threads,
            "batch_size": args.batch_size, "image_size": args.size, "batches": args.batches,
            "images_per_s": args.batches * args.batch_size / dt, "seconds": dt,
            "warmup_seconds": t0 - t_first}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoders", default="auto", help="comma list of dali,nvjpeg,cpu or 'auto' (all available)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    ap.add_argument("--images", type=int, default=1024, help="images in the generated shards")
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--min-px", type=int, default=256)
    ap.add_argument("--max-px", type=int, default=512)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads / workers per loader "
                                                               "(default: cores - 1, at most 16)")
    ap.add_argument("--data-dir", default=None, help="reuse / write shards here instead of a temp folder")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.threads = args.threads or max(1, min(16, (os.cpu_count() or 2) - 1))
    if args.decoders == "auto":
        decoders = []
        if dali_available():
            decoders.append("dali")
        if device == "cuda" and nvjpeg_available():
            decoders.append("nvjpeg")
        decoders.append("cpu")
    else:
        decoders = args.decoders.split(",")
    tmp = None
    if args.data_dir:
        paths = sorted(str(p) for p in Path(args.data_dir).glob("*.tar"))
        if not paths:
            paths = make_shards(args.data_dir, args.images, args.per_shard, args.min_px, args.max_px)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="m3ae-bench-data-")
        t = time.perf_counter()
        paths = make_shards(tmp.name, args.images, args.per_shard, args.min_px, args.max_px)
        print(f"made {len(paths)} shards of {args.images} JPEGs in {time.perf_counter() - t:.1f}s", flush=True)
    results = {"meta": environment(torch.device(device), ("torchvision", "nvidia.dali")), "cpu_count": os.cpu_count(),
               "images": args.images, "source_px": [args.min_px, args.max_px], "loaders": []}
    for dec in decoders:
        try:
            r = bench(paths, dec, device, args)
            print(f"{r['decoder']:>7} on {r['device']}: {r['images_per_s']:9.1f} images/s "
                  f"({r['threads']} CPU threads)", flush=True)
        except Exception as e:  # report and go on with the other loaders
            r = {"decoder": dec, "error": f"{type(e).__name__}: {e}"}
            print(f"{dec:>7}: failed: {r['error']}", flush=True)
        results["loaders"].append(r)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
