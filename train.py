#!/usr/bin/env python
"""Pretrain M3AE / MAE.

`python train.py` with no arguments trains the `tiny` preset on the built-in synthetic
image-caption data (CPU, or the GPU if there is one) and shows loss and samples/s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a clone without an install

import torch

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.data import SyntheticBatches
from m3ae_engine.optim import build_optimizer, scaled_lr, warmup_cosine


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | small | base | large | huge")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--base-lr", type=float, default=1.5e-4 * 10, help="lr = base_lr * batch / 256")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--output-dir", default=None, help="write metrics.jsonl and the final weights here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        raise SystemExit("error: --batch-size and --steps must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = M3AEConfig.from_preset(args.preset)
    model = M3AE(config).to(device)
    lr_peak = scaled_lr(args.base_lr, args.batch_size)
    opt = build_optimizer(model, lr_peak, args.weight_decay)
    data = iter(SyntheticBatches(args.batch_size, config.image_size, config.text_length, seed=args.seed))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    print(f"m3ae-engine: preset={args.preset} params={model.num_parameters() / 1e6:.2f}M device={device} "
          f"batch={args.batch_size} steps={args.steps} peak_lr={lr_peak:.2e}", flush=True)
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm
        bar = tqdm(range(args.steps), dynamic_ncols=True, mininterval=1.0)
    except ImportError:  # pragma: no cover
        bar = range(args.steps)
    first = last = None
    t0, seen = time.perf_counter(), 0
    for step in bar:
        lr = warmup_cosine(step, args.steps, args.warmup_steps, lr_peak)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(data)
        with autocast:
            out = model(batch["image"], batch["text"], batch["text_padding_mask"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        seen += args.batch_size
        if step % args.log_every == 0 or step == args.steps - 1:
            loss = float(out.loss.detach())  # host sync only at the log interval
            if not torch.isfinite(torch.tensor(loss)):
                raise SystemExit(f"error: non-finite loss {loss} at step {step}")
            first = loss if first is None else first
            last = loss
            rate = seen / (time.perf_counter() - t0)
            metrics = {"step": step, "loss": loss, "image_loss": float(out.image_loss),
                       "text_loss": float(out.text_loss), "text_accuracy": float(out.text_accuracy),
                       "lr": lr, "samples_per_s": rate}
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.3f}", img=f"{metrics['image_loss']:.3f}",
                                txt=f"{metrics['text_loss']:.3f}", sps=f"{rate:.0f}")
            if out_dir:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
    print(f"done: loss {first:.4f} -> {last:.4f} in {time.perf_counter() - t0:.1f}s", flush=True)
    if out_dir:
        from safetensors.torch import save_file
        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return first, last


if __name__ == "__main__":
    main()
