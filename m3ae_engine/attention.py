"""Attention over packed (varlen) or padded sequences.

Packed layout: tokens of all samples concatenated, q/k/v [T, H, Dh], `cu_seqlens` int32 [B+1],
`max_seqlen` a static upper bound. Backends: see `available_backends()`; choose per call, with
env `M3AE_ATTENTION`, or let the best available win.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .masking import SequenceLayout

BACKEND_ORDER = ("flash_attn", "torch_varlen", "xformers", "sdpa", "math")


class AttentionBackendUnavailable(RuntimeError):
    pass


def _probe(name: str) -> Optional[str]:
    """None if the backend can run here, else the reason it cannot."""
    if name in ("math", "sdpa"):
        return None
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash-attn is not installed"
        return None
    if name == "torch_varlen":
        try:
            from torch.nn.attention import varlen  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        return None
    if name == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            return "xformers is not installed"
        return None
    return "unknown backend"


def available_backends() -> Dict[str, str]:
    return {name: (_probe(name) or "available") for name in BACKEND_ORDER}


def resolve_backend(backend: Optional[str] = None, device=None) -> str:
    choice = backend or os.environ.get("M3AE_ATTENTION") or "auto"
    if choice != "auto":
        if choice not in BACKEND_ORDER:
            raise ValueError(f"unknown attention backend {choice!r}; choose one of {', '.join(BACKEND_ORDER)} or auto")
        reason = _probe(choice)
        if reason is not None:
            avail = [n for n in BACKEND_ORDER if _probe(n) is None]
            raise AttentionBackendUnavailable(f"attention backend {choice!r} is unavailable ({reason}); "
                                              f"available: {avail}")
        return choice
    if device is None or torch.device(device).type != "cuda":
        return "math"
    for name in BACKEND_ORDER:
        if _probe(name) is None:
            return name
    return "math"


# ----------------------------------------------------------------------------------------------
# math reference: packed -> padded, masked softmax, padded -> packed
# ----------------------------------------------------------------------------------------------
def _pad_index(cu_seqlens: torch.Tensor, max_seqlen: int):
    """[B, S] packed row of each padded slot (clamped) and [B, S] validity."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    j = torch.arange(max_seqlen, device=cu.device)[None, :]
    valid = j < lengths[:, None]
    return torch.where(valid, cu[:-1, None] + j, torch.zeros_like(j)).clamp_min(0), valid


def padded_attention_math(q, k, v, key_padding_mask: Optional[torch.Tensor], scale: Optional[float] = None):
    """q, k, v [B, S, H, Dh]; key_padding_mask [B, S] bool True = ignore. Float32 softmax."""
    dh = q.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(dh)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, S, Dh]
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, S, S]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a row with every key masked gives zeros, not NaN
    out = torch.matmul(probs, vf).transpose(1, 2)  # [B, S, H, Dh]
    return out.to(q.dtype)


def varlen_attention_math(q, k, v, cu_seqlens, max_seqlen: int, scale: Optional[float] = None):
    """q, k, v [T, H, Dh] packed -> [T, H, Dh]. Rows past cu_seqlens[-1] get zeros."""
    index, valid = _pad_index(cu_seqlens, max_seqlen)  # [B, S]
    qp, kp, vp = (t[index] for t in (q, k, v))  # [B, S, H, Dh]
    out_p = padded_attention_math(qp, kp, vp, ~valid, scale)
    out = torch.zeros_like(q)
    flat_index = torch.where(valid, index, torch.full_like(index, q.shape[0])).reshape(-1)
    out = torch.cat([out, out[:1]], 0).index_copy(0, flat_index, out_p.reshape(-1, *q.shape[1:]))
    return out[:-1]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, backend: Optional[str] = None,
                     scale: Optional[float] = None):
    """Non-causal attention within each packed sequence. q, k, v [T, H, Dh]; softmax scale 1/sqrt(Dh)."""
    name = resolve_backend(backend, q.device)
    if name in ("math",) or name not in _VARLEN_IMPLS:
        return varlen_attention_math(q, k, v, cu_seqlens, max_seqlen, scale)
    return _VARLEN_IMPLS[name](q, k, v, cu_seqlens, max_seqlen, scale)


_VARLEN_IMPLS = {}


@dataclass
class AttentionContext:
    """What a block needs to run attention on one layout (built once per forward)."""
    layout: SequenceLayout
    backend: str

    @classmethod
    def build(cls, layout: SequenceLayout, backend: Optional[str], device) -> "AttentionContext":
        return cls(layout, resolve_backend(None if backend in (None, "auto") else backend, device))


def attention(qkv: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """qkv [T, 3, H, Dh] in the context's layout -> [T, H, Dh]."""
    lay = ctx.layout
    q, k, v = qkv.unbind(1)
    if lay.packed:
        out = varlen_attention(q, k, v, lay.cu_seqlens, lay.max_seqlen, backend=ctx.backend)
        return out
    b, s = lay.batch, lay.slot
    q, k, v = (t.reshape(b, s, *t.shape[1:]) for t in (q, k, v))
    if ctx.backend == "math":
        out = padded_attention_math(q, k, v, lay.key_padding_mask)
    else:
        attn_mask = None if lay.key_padding_mask is None else ~lay.key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask).transpose(1, 2)
    return out.reshape(b * s, *out.shape[2:])
