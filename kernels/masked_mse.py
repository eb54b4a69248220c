"""Fused masked MSE: per-patch MSE of the pixel head against patches read straight from the raw image.

Contract: m3ae_engine.ops.reference.masked_mse:  loss = sum_r row_weight[r] * mean_j (pred[r, j] - target[r, j])^2
with target row r = patch patch_index[r] = b * L + l of image b, flattened in (p, p, c) order, from a
uint8 image normalised on the fly ((x / 255 - mean[c]) / std[c]) or an already-normalised float image,
optionally per-patch normalised (MAE norm_pix_loss: (t - mean) / sqrt(var + 1e-6), unbiased var).

The patchified target is never materialised: each program loads its rows' patches from [B, C, H, W]
(a patch is p image rows of p contiguous pixels per channel), holds them in registers next to the
predictions, reduces, and writes one weighted loss per row. The backward recomputes the target the
same way (reading the image again is cheaper than storing an [M, P] target) and writes only
grad_pred = grad * row_weight * 2 / P * (pred - target); no other input gets a gradient.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import check, check_device, check_float, check_index, check_range, interpreting, row_blocks  # noqa: F401 (tests patch interpreting)

_OP = "m3ae.masked_mse"


@triton.jit
def _masked_mse_kernel(pred_ptr, img_ptr, idx_ptr, w_ptr, stats_ptr, gin_ptr, out_ptr, M, C, H, W,
                       GW, L, p, P, IS_UINT8: tl.constexpr, NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # pred [M, P]; img [B, C, H, W]; idx, w [M]; stats [2, C] (mean, std); gin [1] (backward);
    # out: forward [M] fp32 weighted row losses, backward [M, P] grad_pred
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_P)
    rmask = rows < M
    jmask = j < P
    m2 = rmask[:, None] & jmask[None, :]
    # (p, p, c) order: j = (py * p + px) * C + c
    c = j % C
    q = j // C
    px = q % p
    py = q // p
    idx = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    b = idx // L
    l = idx % L
    y0 = (l // GW) * p
    x0 = (l % GW) * p
    off = (b[:, None] * C + c[None, :]) * H * W + (y0[:, None] + py[None, :]) * W + x0[:, None] + px[None, :]
    t = tl.load(img_ptr + off, mask=m2, other=0).to(tl.float32)  # [BLOCK_R, BLOCK_P] target
    if IS_UINT8:
        mean_c = tl.load(stats_ptr + c, mask=jmask, other=0.0)
        std_c = tl.load(stats_ptr + C + c, mask=jmask, other=1.0)
        t = (t / 255.0 - mean_c[None, :]) / std_c[None, :]
    if NORM_PIX:
        mu = tl.sum(tl.where(m2, t, 0.0), axis=1) / P
        dev = tl.where(m2, t - mu[:, None], 0.0)
        var = tl.sum(dev * dev, axis=1) / (P - 1)
        t = dev / tl.sqrt(var + 1e-6)[:, None]
    x = tl.load(pred_ptr + rows[:, None].to(tl.int64) * P + j[None, :], mask=m2, other=0.0).to(tl.float32)
    diff = tl.where(m2, x - t, 0.0)
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if BACKWARD:
        g = tl.load(gin_ptr).to(tl.float32)
        grad = diff * (g * w * 2.0 / P)[:, None]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * P + j[None, :], grad.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        tl.store(out_ptr + rows, w * (tl.sum(diff * diff, axis=1) / P), mask=rmask)


def _launch(pred, imgs, patch_index, row_weight, stats, patch_size, norm_pix_loss, grad_in=None):
    pred = pred.contiguous()
    imgs = imgs.contiguous()
    m, p_len = pred.shape
    b, c, h, w = imgs.shape
    gw = w // patch_size
    l = (h // patch_size) * gw
    block_r, block_p = row_blocks(p_len, m, max_block_d=1 << 14)  # p_len <= 16384 is checked
    backward = grad_in is not None
    out = (torch.empty_like(pred) if backward
           else torch.empty(m, dtype=torch.float32, device=pred.device))  # [M, P] or [M]
    if m == 0:
        return out
    is_u8 = imgs.dtype == torch.uint8
    _masked_mse_kernel[(triton.cdiv(m, block_r),)](
        pred, imgs, patch_index.contiguous(), row_weight.contiguous(), stats if is_u8 else row_weight,
        grad_in if backward else row_weight, out, m, c, h, w, gw, l, patch_size, p_len,
        IS_UINT8=is_u8, NORM_PIX=norm_pix_loss, BACKWARD=backward, BLOCK_R=block_r, BLOCK_P=block_p)
    return out


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("m3ae::masked_mse", mutates_args=())
def masked_mse_op(pred: torch.Tensor, imgs: torch.Tensor, patch_index: torch.Tensor, row_weight: torch.Tensor,
                  stats: Optional[torch.Tensor], patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    b, _, h, w = imgs.shape
    check_range(_OP, "patch_index", patch_index, 0, b * (h // patch_size) * (w // patch_size))
    return _launch(pred, imgs, patch_index, row_weight, stats, patch_size, norm_pix_loss).sum()  # fp32 scalar


@masked_mse_op.register_fake
def _(pred, imgs, patch_index, row_weight, stats, patch_size, norm_pix_loss):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("m3ae::masked_mse_backward", mutates_args=())
def masked_mse_backward_op(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, patch_index: torch.Tensor,
                           row_weight: torch.Tensor, stats: Optional[torch.Tensor], patch_size: int,
                           norm_pix_loss: bool) -> torch.Tensor:
    return _launch(pred, imgs, patch_index, row_weight, stats, patch_size, norm_pix_loss,
                   grad_in=grad.reshape(1).to(torch.float32))


@masked_mse_backward_op.register_fake
def _(grad, pred, imgs, patch_index, row_weight, stats, patch_size, norm_pix_loss):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, imgs, patch_index, row_weight, stats, patch_size, norm_pix_loss = inputs
    ctx.save_for_backward(pred, imgs, patch_index, row_weight, stats)
    ctx.cfg = (patch_size, norm_pix_loss)


def _backward(ctx, grad):
    pred, imgs, patch_index, row_weight, stats = ctx.saved_tensors
    grad_pred = masked_mse_backward_op(grad, pred, imgs, patch_index, row_weight, stats, *ctx.cfg)
    return grad_pred, None, None, None, None, None, None


masked_mse_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# drop-in
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _stats_on(mean: tuple, std: tuple, device: str) -> torch.Tensor:
    return torch.tensor([mean, std], dtype=torch.float32).to(device)


def _stats(mean: tuple, std: tuple, device: torch.device) -> torch.Tensor:
    """[2, C] mean/std on the device, cached: a tensor built from Python lists on a GPU is a pageable
    host-to-device copy that waits for the stream, once per training step."""
    if torch.compiler.is_compiling():  # traced: a constant in the graph
        return torch.tensor([mean, std], dtype=torch.float32, device=device)
    return _stats_on(mean, std, str(device))


def masked_mse(pred: torch.Tensor, imgs: torch.Tensor, patch_index: torch.Tensor, row_weight: torch.Tensor,
               patch_size: int, norm_pix_loss: bool = False, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Weighted masked-patch MSE, float32 scalar (see m3ae_engine.ops.reference.masked_mse).

    pred [M, p*p*C] (gradient flows here only); imgs [B, C, H, W] uint8 (with mean/std) or float
    (already normalised; mean/std ignored, as in the reference); patch_index [M] = b * L + l;
    row_weight [M] float."""
    check(imgs.dim() == 4, f"{_OP}: imgs must be [B, C, H, W], got {tuple(imgs.shape)}")
    b, c, h, w = imgs.shape
    check(patch_size > 0 and h % patch_size == 0 and w % patch_size == 0,
          f"{_OP}: image {h}x{w} is not divisible by patch_size {patch_size}")
    p_len = patch_size * patch_size * c
    check(pred.dim() == 2 and pred.shape[1] == p_len,
          f"{_OP}: pred must be [M, {p_len}] (p*p*C), got {tuple(pred.shape)}")
    check(p_len <= 16384, f"{_OP}: a patch of {p_len} values does not fit one program (max 16384)")
    check(not norm_pix_loss or p_len > 1, f"{_OP}: norm_pix_loss needs more than one value per patch")
    check_float("pred", _OP, pred)
    check(imgs.dtype == torch.uint8 or imgs.dtype in (torch.float32, torch.bfloat16, torch.float16),
          f"{_OP}: imgs must be uint8 or float32/bfloat16/float16, got {imgs.dtype}")
    m = pred.shape[0]
    check_index("patch_index", _OP, patch_index, m)
    check(row_weight.dim() == 1 and row_weight.numel() == m and row_weight.is_floating_point(),
          f"{_OP}: row_weight must be a float [{m}] tensor, got {row_weight.dtype} {tuple(row_weight.shape)}")
    check_device(_OP, pred, imgs=imgs, patch_index=patch_index, row_weight=row_weight)
    stats = None
    if imgs.dtype == torch.uint8:
        check(mean is not None and std is not None, f"{_OP}: uint8 images need mean and std")
        check(len(mean) == c and len(std) == c, f"{_OP}: mean and std need {c} values, got {len(mean)} and {len(std)}")
        stats = _stats(tuple(map(float, mean)), tuple(map(float, std)), pred.device)  # [2, C]
    return masked_mse_op(pred, imgs, patch_index, row_weight.float(), stats, patch_size, norm_pix_loss)
