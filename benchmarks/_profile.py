"""Profiler events of a step or an op, and the kernel categories they are reported by (one place for
benchmarks/step_profile.py and benchmarks/kernels.py)."""
from __future__ import annotations

import re

import torch

# (category, pattern over the kernel / op name); the first match wins, so the specific ones come first
CATEGORIES = [
    ("engine fused ops", r"m3ae::|_gather_fwd_kernel|gather_rows_kernel|_cls_grad_partial|_unshuffle_fwd|"
                         r"_kind_grad_partial|_masked_mse_kernel|_ce_chunk_kernel|m3ae[_:]"),
    ("attention", r"flash|fmha|attention|sdpa|_efficient_attention|cudnn.*(mha|attn)"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|aten::(mm|addmm|bmm|matmul|linear|_addmm_activation)$"),
    ("compiled (inductor)", r"^triton_(poi|per|red|tem)_"),
    ("layer norm", r"layer_norm|layernorm|LayerNorm"),
    ("optimizer", r"multi_tensor|fused_adam|FusedAdam|_fused_adamw|adamw|lerp|addcdiv|addcmul"),
    ("reduction / softmax", r"reduce_kernel|softmax|Softmax|aten::(sum|mean|max|min|amax|logsumexp)$"),
    ("copy / cast / fill", r"[Mm]emcpy|[Mm]emset|copy_|CatArrayBatchedCopy|_to_copy|[Ff]ill|index|scatter|gather"),
    ("elementwise", r"elementwise|vectorized|unrolled|gelu|Gelu|aten::(add|mul|sub|div|where|gelu|neg|exp)"),
]
_COMPILED = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def categorize(name: str) -> str:
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return "other"


def device_events(prof, cuda: bool):
    """(name, microseconds) of every device event (CUDA), or every aten op's self time (CPU: nested ops
    are not counted twice)."""
    for e in prof.events():
        if getattr(e, "is_user_annotation", False):  # spans (optimizer step, compiled graph) over other kernels
            continue
        if cuda:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                yield e.name, e.time_range.elapsed_us()
        elif e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"):
            yield e.name, e.self_cpu_time_total


def breakdown(events, steps: int, step_ms: float, top: int = 12) -> dict:
    per_cat, per_name = {}, {}
    for name, us in events:
        c = per_cat.setdefault(categorize(name), [0.0, 0])
        c[0] += us
        c[1] += 1
        n = per_name.setdefault(name, [0.0, 0])
        n[0] += us
        n[1] += 1
    busy_ms = sum(v[0] for v in per_cat.values()) / steps / 1e3
    cats = [dict(category=k, ms_per_step=v[0] / steps / 1e3, pct_of_step=100 * v[0] / steps / 1e3 / step_ms,
                 launches_per_step=v[1] / steps) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1][0])]
    kernels = [dict(name=k[:120], category=categorize(k), ms_per_step=v[0] / steps / 1e3, launches_per_step=v[1] / steps)
               for k, v in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]]
    return dict(busy_ms=busy_ms, idle_ms=step_ms - busy_ms, launches_per_step=sum(c["launches_per_step"] for c in cats),
                categories=cats, top_kernels=kernels)
