"""Attention over packed (varlen) or padded sequences.

Packed layout: the tokens of all samples concatenated, q/k/v [T, H, Dh] (or qkv [T, 3, H, Dh]),
`cu_seqlens` int32 [B+1] on the same device, `max_seqlen` a static Python int that bounds every
sample's length. Rows past `cu_seqlens[-1]` ("capacity" layout, built on the GPU without a host
sync) are filler: their output is zeros and they get zero gradient, whatever the kernel does there.

Backends (per call `backend=`, else env `M3AE_ATTENTION`, else the first available in AUTO_ORDER):
  flash_attn      the flash-attn package: FA3 (`flash_attn_interface`) on Hopper, FA4
                  (`flash_attn.cute`) on Blackwell, else FA2 varlen functions
  torch_varlen    `torch.nn.attention.varlen.varlen_attn` (PyTorch's FlashAttention-2 kernels)
  xformers        `memory_efficient_attention` + `BlockDiagonalMask` (needs the lengths on the host:
                  the only backend that synchronises)
  sdpa            `scaled_dot_product_attention` on a padded copy with a key-padding mask; PyTorch
                  picks among the fused kernels that take a mask (cuDNN, memory-efficient), never
                  the O(S^2)-memory math kernel on a GPU
  sdpa_cudnn      the same, pinned to cuDNN
  sdpa_efficient  the same, pinned to the memory-efficient (cutlass) kernel
  math            plain PyTorch, float32 (or float64) softmax: the CPU path and the test oracle
SDPA's own flash kernel takes no mask, so padded SDPA cannot use it; `torch_varlen` is that kernel
driven by `cu_seqlens` instead.

Kernels that only run in half precision (flash_attn, torch_varlen, sdpa_cudnn) get q, k, v cast to
the autocast dtype (bf16 outside autocast) and the output cast back to the input dtype. With
backend "auto", float32 inputs outside autocast skip those backends, so full precision stays full.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .masking import SequenceLayout

BACKENDS = ("flash_attn", "torch_varlen", "xformers", "sdpa", "sdpa_cudnn", "sdpa_efficient", "math")

# The order "auto" tries on a GPU; the first backend that runs here wins. The single knob to set
# from benchmarks/attention.py measurements (benchmarks/results/attention_*.json).
AUTO_ORDER = ("torch_varlen", "flash_attn", "sdpa_cudnn", "sdpa", "sdpa_efficient", "xformers", "math")  # measured on H100: benchmarks/results/attention_h100.json (flash_attn, xformers not installed there)

# Backends whose kernels accept only fp16/bf16: fp32 inputs are cast down and the output back up.
HALF_ONLY = frozenset({"flash_attn", "torch_varlen", "sdpa_cudnn"})

ENV_VAR = "M3AE_ATTENTION"

# Head dims the FlashAttention-family kernels compile for (M3AE: 64 encoder, 32 decoder).
_FLASH_HEAD_DIM = {"flash_attn": 256, "torch_varlen": 256, "sdpa_cudnn": 128}


def _head_dim_problem(name: str, head_dim: Optional[int]) -> Optional[str]:
    limit = _FLASH_HEAD_DIM.get(name)
    if head_dim is None or limit is None or (head_dim % 8 == 0 and head_dim <= limit):
        return None
    return f"backend {name!r} needs a head dim that is a multiple of 8 and <= {limit}, got {head_dim}"


class AttentionBackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here; the message lists the ones that can."""


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------
def _cuda_device(device) -> Optional[torch.device]:
    """The CUDA device a probe concerns, or None for a non-CUDA device."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _flash_attn_impl(device: torch.device) -> Tuple[Optional[Callable], str]:
    """(varlen function, description) of the newest flash-attn generation that suits this GPU.
    Cached: the hot path must not re-import or query the device on every call."""
    major = torch.cuda.get_device_capability(device)[0]
    if major >= 10:  # Blackwell: FA4 (CuTe DSL)
        try:
            from flash_attn.cute import flash_attn_varlen_func as fa4
            return fa4, "FA4 (flash_attn.cute)"
        except Exception:
            pass
    if major == 9:  # Hopper: FA3
        try:
            from flash_attn_interface import flash_attn_varlen_func as fa3
            return fa3, "FA3 (flash_attn_interface)"
        except Exception:
            pass
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func as fa2
        return fa2, f"FA2 {getattr(flash_attn, '__version__', '')}".strip()
    except Exception as e:  # ImportError, or a broken build raising anything at import
        return None, f"flash-attn is not installed ({type(e).__name__})"


def _static_probe(name: str, device) -> Optional[str]:
    """None if `name` may run on `device`, else why not (no kernel launched)."""
    if name == "math":
        return None
    if name == "sdpa":
        return None  # any device: on a CPU PyTorch picks its own kernel
    cuda = _cuda_device(device)
    if cuda is None:
        return "needs a CUDA GPU" if torch.cuda.is_available() else "needs a CUDA GPU (none found)"
    major, minor = torch.cuda.get_device_capability(cuda)
    if name == "flash_attn":
        fn, why = _flash_attn_impl(cuda)
        if fn is None:
            return why
        return None if major >= 8 else f"flash-attn needs compute capability >= 8.0, this GPU is {major}.{minor}"
    if name == "torch_varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
        if not torch.backends.cuda.is_flash_attention_available():
            return f"torch {torch.__version__} was built without FlashAttention kernels"
        return None if major >= 8 else f"needs compute capability >= 8.0, this GPU is {major}.{minor}"
    if name == "xformers":
        try:
            import xformers.ops  # noqa: F401
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask  # noqa: F401
        except Exception as e:
            return f"xformers is not installed ({type(e).__name__})"
        return None
    if name == "sdpa_cudnn":
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available"
        return None if major >= 8 else f"cuDNN attention needs compute capability >= 8.0, this GPU is {major}.{minor}"
    if name == "sdpa_efficient":
        return None
    return "unknown backend"


_PROBE_CACHE: Dict[Tuple[str, str], Optional[str]] = {}


def _trial(name: str, device: torch.device) -> Optional[str]:
    """Run the backend once on a tiny input (forward and backward): None if it works, else the error.

    Feature detection rather than assumption: kernels refuse dtypes, head dims, masks or GPUs for
    reasons that vary across versions; finding out once per device is cheaper than guessing.
    """
    try:
        # the first call may come from inside no_grad / inference_mode / autocast: the trial needs none
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            cu = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
            dtype = torch.bfloat16 if name in HALF_ONLY else torch.float32
            # deterministic values: a probe must not consume the caller's random stream
            qkv = torch.arange(5 * 3 * 2 * 64, device=device).sin().view(5, 3, 2, 64).to(dtype)  # 1 filler row
            qkv.requires_grad_(True)
            out = _IMPLS[name](qkv, cu, 3, None)
            out.float().sum().backward()
            torch.cuda.synchronize(device)
        return None
    except Exception as e:  # any failure means "not usable here"; the message says why
        return f"trial call failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _probe(name: str, device=None) -> Optional[str]:
    """None if the backend can run on `device` (default: the current CUDA device), else why not."""
    if name not in BACKENDS:
        return "unknown backend"
    cuda = _cuda_device(device)
    key = (name, str(cuda) if cuda is not None else "cpu")
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    reason = _static_probe(name, device)
    if reason is None and cuda is not None and name != "math":
        if torch.compiler.is_compiling():
            return None  # no trial launches while tracing; the static checks passed
        reason = _trial(name, cuda)
    _PROBE_CACHE[key] = reason
    return reason


def available_backends(device=None) -> Dict[str, str]:
    """{backend: "available" | why not} on `device` (default: the current CUDA device, else CPU)."""
    out = {}
    for name in BACKENDS:
        reason = _probe(name, device)
        if reason is None and name == "flash_attn":
            out[name] = "available: " + _flash_attn_impl(_cuda_device(device))[1]
        else:
            out[name] = "available" if reason is None else reason
    return out


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _half_dtype(device_type: str) -> torch.dtype:
    """The dtype a half-precision-only kernel gets fp32 inputs in: the autocast dtype, else bf16."""
    low = _autocast_dtype(device_type)
    return low if low in (torch.float16, torch.bfloat16) else torch.bfloat16


def resolve_backend(backend: Optional[str] = None, device=None, dtype: Optional[torch.dtype] = None,
                    head_dim: Optional[int] = None) -> str:
    """The backend a call uses: `backend`, else env M3AE_ATTENTION, else the first of AUTO_ORDER that
    runs on `device` ("math" off the GPU). With `dtype` float32 and autocast off, "auto" skips the
    half-precision-only kernels (float64 gets math); with `head_dim`, kernels that lack it."""
    choice = backend or os.environ.get(ENV_VAR) or "auto"
    if choice != "auto":
        if choice not in BACKENDS:
            raise ValueError(f"unknown attention backend {choice!r} (from "
                             f"{'the backend argument' if backend else ENV_VAR}); "
                             f"choose one of {', '.join(BACKENDS)} or auto")
        reason = _probe(choice, device)
        if reason is not None:
            avail = [n for n in BACKENDS if _probe(n, device) is None]
            raise AttentionBackendUnavailable(f"attention backend {choice!r} is unavailable here ({reason}); "
                                              f"available: {', '.join(avail)}")
        return choice
    if _cuda_device(device) is None or dtype == torch.float64:
        return "math"  # no fused GPU kernel takes float64
    full_precision = (dtype in (torch.float32, torch.float64) and _autocast_dtype("cuda") is None)
    for name in AUTO_ORDER:
        if (full_precision and name in HALF_ONLY) or _head_dim_problem(name, head_dim):
            continue
        if _probe(name, device) is None:
            return name
    return "math"


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------
def _check_varlen(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen) -> None:
    """Shape / dtype / device checks (metadata only: no device sync); content checks on the CPU."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [B+1] with B >= 1, got "
                         f"{getattr(cu_seqlens, 'shape', type(cu_seqlens))}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q/k/v are on {qkv.device}; keep them on "
                         f"the same device (moving it per call would synchronise)")
    if isinstance(max_seqlen, torch.Tensor) or not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise ValueError(f"max_seqlen must be a Python int (a static upper bound; a tensor would force a host "
                         f"sync), got {type(max_seqlen).__name__}")
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen must be >= 1, got {max_seqlen}")
    if not qkv.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {qkv.dtype}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():  # free to read values here
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()[:8]}...")
        if int(lengths.max()) > max_seqlen:
            raise ValueError(f"a sequence has length {int(lengths.max())} > max_seqlen {max_seqlen}")
        if int(cu[-1]) > qkv.shape[0]:
            raise ValueError(f"cu_seqlens[-1] = {int(cu[-1])} exceeds the {qkv.shape[0]} packed rows")


def assert_layout_async(cu_seqlens: torch.Tensor, max_seqlen: int, rows: int) -> None:
    """Device-side check of a GPU layout (no host sync): every length in [0, max_seqlen], cu[-1] <= rows."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ok = (lengths >= 0).all() & (lengths.max() <= max_seqlen) & (cu_seqlens[-1] <= rows) & (cu_seqlens[0] == 0)
    torch._assert_async(ok, "varlen attention: cu_seqlens is not a valid layout for max_seqlen / rows")


# ----------------------------------------------------------------------------------------------
# math reference: packed -> padded, masked softmax, padded -> packed
# ----------------------------------------------------------------------------------------------
def _pad_index(cu_seqlens: torch.Tensor, max_seqlen: int):
    """[B, S] packed row of each padded slot (0 where invalid) and [B, S] validity."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    j = torch.arange(max_seqlen, device=cu.device)[None, :]
    valid = j < lengths[:, None]
    return torch.where(valid, cu[:-1, None] + j, torch.zeros_like(j)), valid


def _unpad(out_p: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, rows: int) -> torch.Tensor:
    """[B, S, H, Dh] padded -> [rows, H, Dh] packed; rows no slot maps to (filler) are zeros."""
    out = out_p.new_zeros(rows + 1, *out_p.shape[2:])  # + 1: a sink row for the invalid slots
    flat_index = torch.where(valid, index, torch.full_like(index, rows)).reshape(-1)
    return out.index_copy(0, flat_index, out_p.reshape(-1, *out_p.shape[2:]))[:rows]


def _pad_qkv(qkv: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """qkv [T, 3, H, Dh] -> [B, S, 3, H, Dh], zeros (and zero gradient) in invalid slots."""
    # torch.where, not a multiply: a NaN a kernel leaves in a dead slot's gradient must not leak
    return torch.where(valid[:, :, None, None, None], qkv[index], qkv.new_zeros(()))


def padded_attention_math(q, k, v, key_padding_mask: Optional[torch.Tensor], scale: Optional[float] = None,
                          compute_dtype: Optional[torch.dtype] = None):
    """q, k, v [B, S, H, Dh]; key_padding_mask [B, S] bool, True = ignore. Returns q.dtype.

    compute_dtype: float32 by default (float64 for float64 inputs); the tests pass bf16 to get the
    error of the same math done in low precision. Autocast is off inside: this is the oracle."""
    dh = q.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(dh)
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, S, Dh]
        scores = torch.matmul(qf * scale, kf.transpose(-1, -2))  # [B, H, S, S]
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # a row with every key masked gives zeros, not NaN
        out = torch.matmul(probs, vf).transpose(1, 2)  # [B, S, H, Dh]
    return out.to(q.dtype)


def _math_impl(qkv, cu_seqlens, max_seqlen, scale, compute_dtype=None):
    index, valid = _pad_index(cu_seqlens, max_seqlen)  # [B, S]
    qp, kp, vp = _pad_qkv(qkv, index, valid).unbind(2)  # [B, S, H, Dh] each
    out_p = padded_attention_math(qp, kp, vp, ~valid, scale, compute_dtype)
    return _unpad(out_p, index, valid, qkv.shape[0])


# ----------------------------------------------------------------------------------------------
# SDPA on the padded layout
# ----------------------------------------------------------------------------------------------
def _sdpa_kernels(name: str, device_type: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == "sdpa_cudnn":
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    if name == "sdpa_efficient":
        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    if device_type == "cuda":  # "sdpa": the fused kernels that take a mask; error rather than O(S^2) memory
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    return contextlib.nullcontext()


def _make_sdpa_impl(name: str):
    def impl(qkv, cu_seqlens, max_seqlen, scale):
        index, valid = _pad_index(cu_seqlens, max_seqlen)  # [B, S]
        q, k, v = (t.transpose(1, 2) for t in _pad_qkv(qkv, index, valid).unbind(2))  # [B, H, S, Dh]
        mask = valid[:, None, None, :]  # [B, 1, 1, S] True = attend
        with _sdpa_kernels(name, qkv.device.type):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, H, S, Dh]
        return _unpad(out.transpose(1, 2), index, valid, qkv.shape[0])
    return impl


# ----------------------------------------------------------------------------------------------
# varlen kernels (write garbage, or nothing, into filler rows: masked by the caller)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _accepted_kwargs(fn) -> Optional[frozenset]:
    """The keyword names `fn` accepts, or None for "anything" (FA2/FA3/FA4 signatures differ)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def _filter_kwargs(fn, kwargs: dict) -> dict:
    accepted = _accepted_kwargs(fn)
    return kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}


def _flash_attn_varlen(qkv, cu_seqlens, max_seqlen, scale):
    fn, desc = _flash_attn_impl(qkv.device)
    if desc.startswith("FA2"):
        # the qkv-packed entry point writes dqkv in one buffer: no stack in the backward
        from flash_attn import flash_attn_varlen_qkvpacked_func
        return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                                softmax_scale=scale, causal=False)
    q, k, v = qkv.unbind(1)
    kwargs = _filter_kwargs(fn, dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                                     max_seqlen_k=max_seqlen, softmax_scale=scale, causal=False))
    out = fn(q, k, v, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out  # FA3/FA4 may return (out, lse)


def _torch_varlen(qkv, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.varlen import varlen_attn
    # same signature in torch 2.11 and 2.13: (q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux, scale, ...)
    q, k, v = qkv.unbind(1)  # [T, H, Dh] views; the kernel takes strided rows
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)


def _xformers_varlen(qkv, cu_seqlens, max_seqlen, scale):
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    rows = qkv.shape[0]
    starts = cu_seqlens.tolist()  # host sync: xformers builds its block mask from Python ints
    seqlens = [b - a for a, b in zip(starts[:-1], starts[1:]) if b > a]
    if starts[-1] < rows:
        seqlens.append(rows - starts[-1])  # filler rows form their own block, zeroed by the caller
    try:
        bias = BlockDiagonalMask.from_seqlens(seqlens, device=qkv.device)
    except TypeError:  # older xformers: no device argument
        bias = BlockDiagonalMask.from_seqlens(seqlens)
    q, k, v = (t[None] for t in qkv.unbind(1))  # [1, T, H, Dh]
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)[0]


_IMPLS: Dict[str, Callable] = {
    "flash_attn": _flash_attn_varlen,
    "torch_varlen": _torch_varlen,
    "xformers": _xformers_varlen,
    "sdpa": _make_sdpa_impl("sdpa"),
    "sdpa_cudnn": _make_sdpa_impl("sdpa_cudnn"),
    "sdpa_efficient": _make_sdpa_impl("sdpa_efficient"),
    "math": lambda qkv, cu, s, scale: _math_impl(qkv, cu, s, scale),
}
_ZERO_FILLER = frozenset({"flash_attn", "torch_varlen", "xformers"})  # leave filler rows unwritten / garbage


class _ZeroGradRows(torch.autograd.Function):
    """Identity forward; the backward zeroes the gradient of filler rows (kernels leave garbage there)."""

    @staticmethod
    def forward(ctx, x, valid):  # x [T, ...], valid [T, 1, ...] bool
        ctx.save_for_backward(valid)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (valid,) = ctx.saved_tensors
        return torch.where(valid, grad, grad.new_zeros(())), None


def _run(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, backend: Optional[str],
         scale: Optional[float], exact: bool, validate: bool) -> torch.Tensor:
    """qkv [T, 3, H, Dh] -> [T, H, Dh] with the chosen backend."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [T, 3, H, Dh], got {tuple(qkv.shape)}")
    if validate:
        _check_varlen(qkv, cu_seqlens, max_seqlen)
    name = resolve_backend(backend, qkv.device, qkv.dtype, qkv.shape[-1])
    problem = _head_dim_problem(name, qkv.shape[-1])
    if problem:
        raise ValueError(problem + "; use backend 'sdpa_efficient', 'sdpa' or 'math'")
    in_dtype = qkv.dtype
    if name in HALF_ONLY and in_dtype not in (torch.float16, torch.bfloat16):
        qkv = qkv.to(_half_dtype(qkv.device.type))
    if cu_seqlens.dtype != torch.int32 and name != "math":
        cu_seqlens = cu_seqlens.to(torch.int32)  # the kernels index with int32
    rows = qkv.shape[0]
    if name in _ZERO_FILLER and not exact:
        valid = (torch.arange(rows, device=qkv.device) < cu_seqlens[-1])[:, None, None]  # [T, 1, 1]
        out = _IMPLS[name](_ZeroGradRows.apply(qkv, valid[:, None]), cu_seqlens, max_seqlen, scale)
        out = torch.where(valid, out, out.new_zeros(()))  # [T, H, Dh]
    else:
        out = _IMPLS[name](qkv, cu_seqlens, max_seqlen, scale)
    return out if out.dtype == in_dtype else out.to(in_dtype)


def varlen_attention_qkvpacked(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                               backend: Optional[str] = None, scale: Optional[float] = None, *,
                               exact: bool = False, validate: bool = True) -> torch.Tensor:
    """Non-causal attention within each packed sequence. qkv [T, 3, H, Dh] -> [T, H, Dh].

    cu_seqlens [B+1] int32 on qkv's device; max_seqlen: Python int >= every length; scale defaults
    to 1/sqrt(Dh). exact=True promises cu_seqlens[-1] == T (skips zeroing the filler rows);
    validate=False skips the argument checks (the caller did them once per layout)."""
    return _run(qkv, cu_seqlens, max_seqlen, backend, scale, exact, validate)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, backend: Optional[str] = None, scale: Optional[float] = None, *,
                     exact: bool = False, validate: bool = True) -> torch.Tensor:
    """Non-causal attention within each packed sequence. q, k, v [T, H, Dh] -> [T, H, Dh].

    Same contract as `varlen_attention_qkvpacked`; q, k, v are stacked into one [T, 3, H, Dh] buffer
    (the packed kernels and the padded gather read it in one pass)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a [T, H, Dh] tensor, got {getattr(t, 'shape', type(t))}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape [T, H, Dh], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    return _run(torch.stack([q, k, v], 1), cu_seqlens, max_seqlen, backend, scale, exact, validate)


# ----------------------------------------------------------------------------------------------
# what the model calls
# ----------------------------------------------------------------------------------------------
@dataclass
class AttentionContext:
    """What a block needs to run attention on one layout (built once per forward per stack)."""
    layout: SequenceLayout
    backend: str  # resolved for the device (the name full-precision inputs would use may differ)
    requested: Optional[str] = None  # None = auto / env
    _resolved: Dict[tuple, str] = field(default_factory=dict, repr=False)  # per (dtype, head dim, autocast)

    @classmethod
    def build(cls, layout: SequenceLayout, backend: Optional[str], device) -> "AttentionContext":
        requested = None if backend in (None, "auto") else backend
        name = resolve_backend(requested, device)
        if layout.packed:
            if layout.cu_seqlens.device.type == "cuda":
                assert_layout_async(layout.cu_seqlens, layout.max_seqlen, layout.rows)
            else:
                _check_varlen(torch.empty(layout.rows, 3, 1, 1, device=layout.cu_seqlens.device),
                              layout.cu_seqlens, layout.max_seqlen)
        return cls(layout, name, requested)

    def backend_for(self, dtype: torch.dtype, head_dim: Optional[int] = None) -> str:
        """Auto re-resolves per dtype: fp32 without autocast avoids half-only kernels, fp64 gets math."""
        if self.requested is not None:
            return self.backend
        key = (dtype, head_dim, _autocast_dtype("cuda"))  # every block of a stack asks the same question
        if key not in self._resolved:
            self._resolved[key] = resolve_backend(None, self.layout.cu_seqlens.device, dtype, head_dim)
        return self._resolved[key]


def attention(qkv: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """qkv [T, 3, H, Dh] in the context's layout -> [T, H, Dh]."""
    lay = ctx.layout
    name = ctx.backend_for(qkv.dtype, qkv.shape[-1])
    if lay.packed:
        return varlen_attention_qkvpacked(qkv, lay.cu_seqlens, lay.max_seqlen, backend=name, exact=lay.exact,
                                          validate=False)
    # padded layout: every sample owns `slot` rows; kept padded text positions are masked keys
    b, s = lay.batch, lay.slot
    q, k, v = (t.reshape(b, s, *t.shape[1:]) for t in qkv.unbind(1))  # [B, S, H, Dh]
    if name == "math":
        out = padded_attention_math(q, k, v, lay.key_padding_mask)
    else:
        attn_mask = None if lay.key_padding_mask is None else ~lay.key_padding_mask[:, None, None, :]
        in_dtype = q.dtype
        if name in HALF_ONLY and in_dtype not in (torch.float16, torch.bfloat16):
            q, k, v = (t.to(_half_dtype(q.device.type)) for t in (q, k, v))
        # varlen kernels cannot express an arbitrary key mask: they map to SDPA's fused kernels here
        kernels = name if name in ("sdpa_cudnn", "sdpa_efficient") else "sdpa"
        with _sdpa_kernels(kernels, q.device.type):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=attn_mask).transpose(1, 2)
        out = out.to(in_dtype)
    return out.reshape(b * s, *out.shape[2:])
