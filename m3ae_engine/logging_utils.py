"""Rank-0 logging: a tqdm bar, a JSONL metrics file, TensorBoard scalars (when tensorboard is installed),
and the MFU estimate (m3ae_engine.flops). Other ranks get a logger that does nothing."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

from .flops import device_peak_tflops, m3ae_flops

def peak_flops(device: torch.device) -> Optional[float]:
    """bf16 dense peak FLOP/s of the training GPU (the MFU denominator), None off the GPU or if unknown."""
    if device.type != "cuda":
        return None
    peak = device_peak_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else peak * 1e12


def flops_per_sample_fn(model_config):
    """Model FLOPs of one training sample from the batch's text padding mask (m3ae_engine.flops)."""
    def per_sample(text_padding_mask: torch.Tensor) -> float:
        lengths = (1 - text_padding_mask.long()).sum(1)
        return float(m3ae_flops(model_config, lengths, training=True))
    return per_sample


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


class Logger:
    def __init__(self, enabled: bool, total_steps: int, start_step: int, output_dir: Optional[str],
                 tensorboard: bool):
        self.enabled = enabled
        self.bar = self.jsonl = self.tb = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, mininterval=1.0)
        except ImportError:  # pragma: no cover
            pass
        if output_dir:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out / "metrics.jsonl", "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(str(out / "tensorboard"))
                except Exception:  # tensorboard is optional
                    self.tb = None

    def print(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)
            sys.stdout.flush()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None and "loss" in metrics:  # training metrics (eval results have eval_* keys)
            post = {"loss": f"{metrics['loss']:.3f}", "img": f"{metrics['image_loss']:.3f}",
                    "txt": f"{metrics['text_loss']:.3f}", "lr": f"{metrics['lr']:.1e}",
                    "sps": f"{metrics['samples_per_s']:.0f}", "mem": f"{metrics['memory_gb']:.1f}G"}
            if metrics.get("mfu") is not None:
                post["mfu"] = f"{100 * metrics['mfu']:.1f}%"
            if metrics.get("skipped_steps"):
                post["skip"] = str(metrics["skipped_steps"])
            self.bar.set_postfix(post, refresh=False)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(metrics) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else k.replace("_", "/", 1),
                                       v, metrics["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
