"""Fused masking gather: packed visible rows [T, D] from (CLS, image tokens, text tokens) in one launch.

Contract: m3ae_engine.ops.reference.gather. Per packed row t the source code row_source[t] is
  -1 CLS, -2 filler (zero row), 0 <= s < B*Li image row s, B*Li <= s < B*Li + B*Lt text row s - B*Li.
The index maps come from m3ae_engine.model.masking.build_plan (packed or padded layout, CLS first per
sample, text padding dropped); cu_seqlens / max_seqlen live in the plan, so there is no host sync.

Backward uses the inverse maps (image_row_of / text_row_of: packed row of each token, -1 if masked),
so it is a pure gather with no atomics: grad_image[s] = grad_out[image_row_of[s]] or 0. The CLS
gradient is a sum over the (few) CLS rows: per-program partial sums whose loads are masked to the CLS
rows only (the other rows are never read), then one small torch sum.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from m3ae_engine.ops.index_maps import inverse_map

from ._common import (check, check_device, check_float, check_index, check_range, gather_rows,
                      reduce_rows_per_program, row_blocks)

_OP = "m3ae.gather"


@triton.jit
def _gather_fwd_kernel(img_ptr, txt_ptr, cls_ptr, src_ptr, out_ptr, T, D, n_img, n_txt,
                       HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # img [n_img, D], txt [n_txt, D], cls [D], src [T], out [T, D]
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < T
    cmask = cols < D
    s = tl.load(src_ptr + rows, mask=rmask, other=-2).to(tl.int64)
    is_img = (s >= 0) & (s < n_img)
    is_txt = (s >= n_img) & (s < n_img + n_txt)
    # clamp the offsets of rows that do not read a source (masked loads still form addresses)
    img_row = tl.where(is_img, s, 0)
    txt_row = tl.where(is_txt, s - n_img, 0)
    x = tl.load(img_ptr + img_row[:, None] * D + cols[None, :], mask=is_img[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    x += tl.load(txt_ptr + txt_row[:, None] * D + cols[None, :], mask=is_txt[:, None] & cmask[None, :],
                 other=0.0).to(tl.float32)
    if HAS_CLS:
        c = tl.load(cls_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # [BLOCK_D]
        x = tl.where((s == -1)[:, None], c[None, :], x)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], x.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _cls_grad_partial_kernel(grad_ptr, src_ptr, part_ptr, T, D,
                             ROWS_PER_PROG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad [T, D] -> part [P, D] fp32: sum of the CLS rows (src == -1) among this program's rows
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = pid_p * ROWS_PER_PROG + start + tl.arange(0, BLOCK_R)
        rmask = rows < T
        s = tl.load(src_ptr + rows, mask=rmask, other=0)
        hit = rmask & (s == -1)
        g = tl.load(grad_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=hit[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(g, axis=0)
    tl.store(part_ptr + pid_p * D + cols, acc, mask=cmask)


def _launch_fwd(image_tokens, text_tokens, cls, row_source):
    ref = image_tokens if image_tokens is not None else text_tokens
    d = ref.shape[-1]
    t = row_source.numel()
    img = image_tokens.reshape(-1, d) if image_tokens is not None else None
    txt = text_tokens.reshape(-1, d) if text_tokens is not None else None
    n_img = img.shape[0] if img is not None else 0
    n_txt = txt.shape[0] if txt is not None else 0
    check_range(_OP, "row_source", row_source, -2, n_img + n_txt)
    out = torch.empty(t, d, dtype=ref.dtype, device=ref.device)  # [T, D]
    if t == 0 or d == 0:
        return out
    br, bd = row_blocks(d, t)
    _gather_fwd_kernel[(triton.cdiv(t, br), triton.cdiv(d, bd))](
        img if img is not None else out, txt if txt is not None else out, cls if cls is not None else out,
        row_source, out, t, d, n_img, n_txt, HAS_CLS=cls is not None, BLOCK_R=br, BLOCK_D=bd)
    return out


def _cls_grad(grad_out: torch.Tensor, row_source: torch.Tensor) -> torch.Tensor:
    t, d = grad_out.shape
    if t == 0:
        return torch.zeros(d, dtype=torch.float32, device=grad_out.device)
    br, bd = row_blocks(d, t)
    rpp = reduce_rows_per_program(t, br)
    n_prog = triton.cdiv(t, rpp)
    part = torch.empty(n_prog, d, dtype=torch.float32, device=grad_out.device)  # [P, D]
    _cls_grad_partial_kernel[(n_prog, triton.cdiv(d, bd))](grad_out, row_source, part, t, d,
                                                           ROWS_PER_PROG=rpp, BLOCK_R=br, BLOCK_D=bd)
    return part.sum(0)  # [D] fp32


# ----------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile: no graph break, fake tensors give the shapes)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("m3ae::gather", mutates_args=())
def gather_op(image_tokens: Optional[torch.Tensor], text_tokens: Optional[torch.Tensor],
              cls: Optional[torch.Tensor], row_source: torch.Tensor, image_row_of: Optional[torch.Tensor],
              text_row_of: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch_fwd(image_tokens if image_tokens is None else image_tokens.contiguous(),
                       text_tokens if text_tokens is None else text_tokens.contiguous(),
                       cls if cls is None else cls.contiguous(), row_source.contiguous())


@gather_op.register_fake
def _(image_tokens, text_tokens, cls, row_source, image_row_of, text_row_of):
    ref = image_tokens if image_tokens is not None else text_tokens
    return ref.new_empty(row_source.shape[0], ref.shape[-1])


@torch.library.custom_op("m3ae::gather_backward", mutates_args=())
def gather_backward_op(grad_out: torch.Tensor, row_source: torch.Tensor, image_row_of: Optional[torch.Tensor],
                       text_row_of: Optional[torch.Tensor], has_cls: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_image [B*Li, D], grad_text [B*Lt, D], grad_cls [D] fp32); empty where the input is absent."""
    g = grad_out.contiguous()
    t, d = g.shape
    for name, inv in (("image_row_of", image_row_of), ("text_row_of", text_row_of)):
        if inv is not None:
            check_range(_OP, name, inv, -1, t)
    empty = g.new_empty(0, d)
    gi = gather_rows(g, image_row_of.contiguous()) if image_row_of is not None else empty
    gt = gather_rows(g, text_row_of.contiguous()) if text_row_of is not None else empty.clone()
    gc = _cls_grad(g, row_source.contiguous()) if has_cls else g.new_empty(0, dtype=torch.float32)
    return gi, gt, gc


@gather_backward_op.register_fake
def _(grad_out, row_source, image_row_of, text_row_of, has_cls):
    d = grad_out.shape[-1]
    gi = grad_out.new_empty(image_row_of.shape[0] if image_row_of is not None else 0, d)
    gt = grad_out.new_empty(text_row_of.shape[0] if text_row_of is not None else 0, d)
    gc = grad_out.new_empty(d if has_cls else 0, dtype=torch.float32)
    return gi, gt, gc


def _setup_context(ctx, inputs, output):
    image_tokens, text_tokens, cls, row_source, image_row_of, text_row_of = inputs
    ctx.save_for_backward(row_source, image_row_of, text_row_of)
    ctx.shapes = tuple(None if x is None else (x.shape, x.dtype) for x in (image_tokens, text_tokens, cls))


def _backward(ctx, grad_out):
    row_source, image_row_of, text_row_of = ctx.saved_tensors
    (img_meta, txt_meta, cls_meta) = ctx.shapes
    gi, gt, gc = gather_backward_op(grad_out, row_source, image_row_of if img_meta is not None else None,
                                    text_row_of if txt_meta is not None else None, cls_meta is not None)
    grad_image = gi.view(img_meta[0]).to(img_meta[1]) if img_meta is not None else None
    grad_text = gt.view(txt_meta[0]).to(txt_meta[1]) if txt_meta is not None else None
    grad_cls = gc.view(cls_meta[0]).to(cls_meta[1]) if cls_meta is not None else None
    return grad_image, grad_text, grad_cls, None, None, None


gather_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# drop-in
# ----------------------------------------------------------------------------------------------
def gather(image_tokens: Optional[torch.Tensor], text_tokens: Optional[torch.Tensor], cls: Optional[torch.Tensor],
           row_source: torch.Tensor, image_row_of: Optional[torch.Tensor] = None,
           text_row_of: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed rows [T, D] (see m3ae_engine.ops.reference.gather). image [B, Li, D], text [B, Lt, D],
    cls [D]; the inverse maps [B*Li] / [B*Lt] are built here (one scatter) when not given."""
    check(image_tokens is not None or text_tokens is not None, f"{_OP}: needs image_tokens or text_tokens")
    ref = image_tokens if image_tokens is not None else text_tokens
    d = ref.shape[-1]
    for name, x in (("image_tokens", image_tokens), ("text_tokens", text_tokens)):
        if x is not None:
            check(x.dim() == 3 and x.shape[-1] == d, f"{_OP}: {name} must be [B, L, {d}], got {tuple(x.shape)}")
            check_float(name, _OP, x)
    if image_tokens is not None and text_tokens is not None:
        check(image_tokens.shape[0] == text_tokens.shape[0],
              f"{_OP}: image_tokens and text_tokens have batch {image_tokens.shape[0]} and {text_tokens.shape[0]}")
    if cls is not None:
        check(cls.numel() == d, f"{_OP}: cls must have {d} elements, got {tuple(cls.shape)}")
        check_float("cls", _OP, cls)
    check_index("row_source", _OP, row_source)
    check_device(_OP, ref, image_tokens=image_tokens, text_tokens=text_tokens, cls=cls, row_source=row_source,
                 image_row_of=image_row_of, text_row_of=text_row_of)
    n_img = image_tokens.shape[0] * image_tokens.shape[1] if image_tokens is not None else 0
    n_txt = text_tokens.shape[0] * text_tokens.shape[1] if text_tokens is not None else 0
    if image_tokens is not None:
        if image_row_of is None:
            image_row_of = inverse_map(row_source, 0, n_img)
        check_index("image_row_of", _OP, image_row_of, n_img)
    else:
        image_row_of = None
    if text_tokens is not None:
        if text_row_of is None:
            text_row_of = inverse_map(row_source, n_img, n_txt)
        check_index("text_row_of", _OP, text_row_of, n_txt)
    else:
        text_row_of = None
    return gather_op(image_tokens, text_tokens, cls.reshape(d) if cls is not None else None, row_source,
                     image_row_of, text_row_of)
