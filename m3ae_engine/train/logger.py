"""Rank-0 logging: a tqdm bar, a JSONL metrics file, TensorBoard scalars (when tensorboard is installed),
optionally Weights & Biases (`wandb_project`; imported only then), and the MFU estimate
(m3ae_engine.model.flops). Other ranks get a logger that does nothing."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

from ..model.flops import device_peak_tflops, m3ae_flops

def peak_flops(device: torch.device) -> Optional[float]:
    """bf16 dense peak FLOP/s of the training GPU (the MFU denominator), None off the GPU or if unknown."""
    if device.type != "cuda":
        return None
    peak = device_peak_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else peak * 1e12


def flops_per_sample_fn(model_config):
    """Model FLOPs of one training sample from the batch's text padding mask (m3ae_engine.model.flops)."""
    def per_sample(text_padding_mask: torch.Tensor) -> float:
        lengths = (1 - text_padding_mask.long()).sum(1)
        return float(m3ae_flops(model_config, lengths, training=True))
    return per_sample


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def start_wandb(project: str, name: Optional[str], output_dir: Optional[str], config: Optional[dict]):
    """A W&B run (the official M3AE code logs to W&B). WANDB_MODE=offline writes it under
    OUTPUT_DIR/wandb without a network (`wandb sync` uploads it later)."""
    try:
        import wandb
    except ImportError:
        from ..model.config import ConfigError
        raise ConfigError("--wandb-project needs the wandb package: pip install wandb") from None
    return wandb.init(project=project, name=name, dir=output_dir, config=config, reinit=True)


class Logger:
    def __init__(self, enabled: bool, total_steps: int, start_step: int, output_dir: Optional[str],
                 tensorboard: bool, wandb_project: Optional[str] = None, wandb_name: Optional[str] = None,
                 wandb_config: Optional[dict] = None):
        self.enabled = enabled
        self.bar = self.jsonl = self.tb = self.wandb = None
        self.output_dir, self.notes = output_dir, []
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
                    # on resume, drop the events logged after the checkpoint by the run that was cut off
                    # (as metrics.jsonl is truncated): each step is shown once
                    self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
                except Exception as e:  # tensorboard is optional, but say that it is off
                    self.notes.append(f"no TensorBoard scalars ({type(e).__name__}: {e}; pip install tensorboard)")
        if wandb_project:
            self.wandb = start_wandb(wandb_project, wandb_name or (Path(output_dir).name if output_dir else None),
                                     output_dir, wandb_config)

    def outputs_line(self, final: bool = False) -> str:
        """Where this run's files go (at the start) or went (at the end)."""
        if not self.output_dir:
            return "outputs: none (no --output-dir): nothing is saved"
        out = Path(self.output_dir)
        names = ["metrics.jsonl"] + (["tensorboard/"] if self.tb is not None else []) + ["checkpoints/"]
        if final and (out / "model.safetensors").is_file():
            names.append("model.safetensors")
        elif not final:
            names.append("model.safetensors at the end")
        line = f"outputs {'saved in' if final else 'go to'} {out}/: {', '.join(names)}"
        if self.tb is not None:
            line += f"  (tensorboard --logdir {out / 'tensorboard'})"
        if self.wandb is not None:
            line += f"  W&B run: {self.wandb.dir}"
        return "; ".join([line] + self.notes)

    def print(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)
            sys.stdout.flush()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, metrics: dict, display_lr: Optional[float] = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None and "loss" in metrics:  # training metrics (eval results have eval_* keys)
            post = {"loss": f"{metrics['loss']:.3f}", "img": f"{metrics['image_loss']:.3f}",
                    "txt": f"{metrics['text_loss']:.3f}",
                    "lr": f"{metrics['lr'] if display_lr is None else display_lr:.1e}",
                    "sps": f"{metrics['samples_per_s']:.0f}", "mem": f"{metrics['memory_gb']:.1f}G"}
            if metrics.get("mfu") is not None:
                post["mfu"] = f"{100 * metrics['mfu']:.1f}%"
            if metrics.get("skipped_steps"):
                post["skip"] = str(metrics["skipped_steps"])
            self.bar.set_postfix(post, refresh=True)  # shown now, not at the next step's redraw
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(metrics) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else k.replace("_", "/", 1),
                                       v, metrics["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))},
                           step=metrics["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
