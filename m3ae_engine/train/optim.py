"""The official optimisation recipe: AdamW (0.9, 0.95), wd 0.05 with the official no-decay list,
lr = base_lr * global_batch / 256, linear warmup then cosine decay per step."""
from __future__ import annotations

import math

import torch


def scaled_lr(base_lr: float, global_batch: int) -> float:
    return base_lr * global_batch / 256.0


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float, init_lr: float = 0.0,
                  end_lr: float = 0.0) -> float:
    """optax.warmup_cosine_decay_schedule: linear init->peak over warmup, cosine peak->end until total."""
    if warmup_steps > 0 and step < warmup_steps:
        return init_lr + (peak_lr - init_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1e-8)  # float steps (epochs) work too
    t = min(max(step - warmup_steps, 0), decay_steps) / decay_steps
    return end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(model, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.95), fused: bool = None):
    """AdamW over the model's official param groups; torch's fused AdamW on CUDA."""
    groups = model.param_groups(weight_decay) if hasattr(model, "param_groups") else model.parameters()
    if fused is None:
        fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
