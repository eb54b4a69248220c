"""Fused unshuffle: the whole decoder input [R, Dd] in one pass.

Contract: m3ae_engine.ops.reference.unshuffle. Row r of the output is
  kind 0/1 (image/text):  (visible[row_visible[r]] or mask_tokens[kind]) + type[kind] + pos_table[row_pos[r]]
  kind 2 (CLS):           visible[row_visible[r]] (no mask token, position or type)
  kind -1 (filler):       0
computed in fp32 and stored once in the visible dtype: MAE's "append mask tokens, gather with
ids_restore, add the decoder position embedding", plus M3AE's type embeddings, without the
[B, L, Dd] intermediates.

Backward (no atomics): grad_visible[t] = grad_out[row_of_visible[t]] or 0 (a gather through the
inverse map); the mask-token and type-embedding gradients are sums over rows by kind: per-program
partial sums [P, 4, Dd] (only the rows that contribute are loaded), then one small torch sum. The
position table is fixed sin-cos: no gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from m3ae_engine.ops.index_maps import decoder_row_of_visible

from ._common import (check, check_device, check_float, check_index, check_range, gather_rows,
                      reduce_rows_per_program, row_blocks)

_OP = "m3ae.unshuffle"


@triton.jit
def _unshuffle_fwd_kernel(vis_ptr, mask_ptr, type_ptr, pos_ptr, rv_ptr, rk_ptr, rp_ptr, out_ptr, R, D,
                          HAS_TYPE: tl.constexpr, HAS_POS: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # visible [T, D], mask/type [2, D], pos [P, D], row maps [R], out [R, D]
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    vis = tl.load(rv_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    kind = tl.load(rk_ptr + rows, mask=rmask, other=-1)
    is_tok = (kind == 0) | (kind == 1)
    has_vis = vis >= 0
    keep = (kind >= 0) & (has_vis | is_tok)
    kc = tl.where(kind == 1, 1, 0).to(tl.int64)
    c2 = cmask[None, :]
    x = tl.load(vis_ptr + tl.where(has_vis, vis, 0)[:, None] * D + cols[None, :],
                mask=(has_vis & keep)[:, None] & c2, other=0.0).to(tl.float32)
    mt = tl.load(mask_ptr + kc[:, None] * D + cols[None, :], mask=(is_tok & ~has_vis)[:, None] & c2,
                 other=0.0).to(tl.float32)
    x = tl.where(has_vis[:, None], x, mt)
    if HAS_TYPE:
        x += tl.load(type_ptr + kc[:, None] * D + cols[None, :], mask=is_tok[:, None] & c2, other=0.0).to(tl.float32)
    if HAS_POS:
        pos = tl.where(is_tok, tl.load(rp_ptr + rows, mask=rmask, other=0), 0).to(tl.int64)
        x += tl.load(pos_ptr + pos[:, None] * D + cols[None, :], mask=is_tok[:, None] & c2, other=0.0).to(tl.float32)
    x = tl.where(keep[:, None], x, 0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], x.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & c2)


@triton.jit
def _kind_grad_partial_kernel(grad_ptr, rv_ptr, rk_ptr, part_ptr, R, D,
                              NEED_MASK: tl.constexpr, NEED_TYPE: tl.constexpr, ROWS_PER_PROG: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad [R, D] -> part [P, 4, D] fp32: (mask image, mask text, type image, type text) partial sums
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    m0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    m1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    t0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    t1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = pid_p * ROWS_PER_PROG + start + tl.arange(0, BLOCK_R)
        rmask = rows < R
        vis = tl.load(rv_ptr + rows, mask=rmask, other=-1)
        kind = tl.load(rk_ptr + rows, mask=rmask, other=-1)
        is_tok = rmask & ((kind == 0) | (kind == 1))
        is_mask = is_tok & (vis < 0)
        need = is_mask
        if NEED_TYPE:
            need = is_tok
        g = tl.load(grad_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=need[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        if NEED_MASK:
            m0 += tl.sum(tl.where((is_mask & (kind == 0))[:, None], g, 0.0), axis=0)
            m1 += tl.sum(tl.where((is_mask & (kind == 1))[:, None], g, 0.0), axis=0)
        if NEED_TYPE:
            t0 += tl.sum(tl.where((kind == 0)[:, None], g, 0.0), axis=0)
            t1 += tl.sum(tl.where((kind == 1)[:, None], g, 0.0), axis=0)
    base = part_ptr + pid_p * 4 * D + cols
    tl.store(base, m0, mask=cmask)
    tl.store(base + D, m1, mask=cmask)
    tl.store(base + 2 * D, t0, mask=cmask)
    tl.store(base + 3 * D, t1, mask=cmask)


def _kind_grads(grad_out, row_visible, row_kind, need_mask, need_type):
    r, d = grad_out.shape
    if r == 0:
        return torch.zeros(4, d, dtype=torch.float32, device=grad_out.device)
    br, bd = row_blocks(d, r)
    rpp = reduce_rows_per_program(r, br)
    n_prog = triton.cdiv(r, rpp)
    part = torch.empty(n_prog, 4, d, dtype=torch.float32, device=grad_out.device)  # [P, 4, D]
    _kind_grad_partial_kernel[(n_prog, triton.cdiv(d, bd))](
        grad_out, row_visible, row_kind, part, r, d, NEED_MASK=need_mask, NEED_TYPE=need_type,
        ROWS_PER_PROG=rpp, BLOCK_R=br, BLOCK_D=bd)
    return part.sum(0)  # [4, D]


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("m3ae::unshuffle", mutates_args=())
def unshuffle_op(visible: torch.Tensor, mask_tokens: torch.Tensor, type_embeddings: Optional[torch.Tensor],
                 pos_table: Optional[torch.Tensor], row_visible: torch.Tensor, row_kind: torch.Tensor,
                 row_pos: torch.Tensor, row_of_visible: torch.Tensor) -> torch.Tensor:
    visible = visible.contiguous()
    t, d = visible.shape
    r = row_visible.numel()
    check_range(_OP, "row_visible", row_visible, -1, t)
    check_range(_OP, "row_kind", row_kind, -1, 3)
    if pos_table is not None:
        is_tok = (row_kind == 0) | (row_kind == 1)
        check_range(_OP, "row_pos (image/text rows)", torch.where(is_tok, row_pos, torch.zeros_like(row_pos)),
                    0, pos_table.shape[0])
    out = torch.empty(r, d, dtype=visible.dtype, device=visible.device)  # [R, D]
    if r == 0 or d == 0:
        return out
    br, bd = row_blocks(d, r)
    mask_tokens = mask_tokens.contiguous()
    _unshuffle_fwd_kernel[(triton.cdiv(r, br), triton.cdiv(d, bd))](
        visible if t > 0 else mask_tokens,  # no visible row (keep count 0): never read; avoid an empty buffer
        mask_tokens,
        type_embeddings.contiguous() if type_embeddings is not None else mask_tokens,
        pos_table.contiguous() if pos_table is not None else mask_tokens,
        row_visible.contiguous(), row_kind.contiguous(), row_pos.contiguous(), out, r, d,
        HAS_TYPE=type_embeddings is not None, HAS_POS=pos_table is not None, BLOCK_R=br, BLOCK_D=bd)
    return out


@unshuffle_op.register_fake
def _(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos, row_of_visible):
    return visible.new_empty(row_visible.shape[0], visible.shape[-1])


@torch.library.custom_op("m3ae::unshuffle_backward", mutates_args=())
def unshuffle_backward_op(grad_out: torch.Tensor, row_visible: torch.Tensor, row_kind: torch.Tensor,
                          row_of_visible: torch.Tensor, need_mask: bool, need_type: bool
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_visible [T, D] in grad_out's dtype, kind sums [4, D] fp32: mask img/txt, type img/txt)."""
    g = grad_out.contiguous()
    check_range(_OP, "row_of_visible", row_of_visible, -1, g.shape[0])
    gv = gather_rows(g, row_of_visible.contiguous())
    if need_mask or need_type:
        gk = _kind_grads(g, row_visible.contiguous(), row_kind.contiguous(), need_mask, need_type)
    else:
        gk = torch.zeros(4, g.shape[1], dtype=torch.float32, device=g.device)
    return gv, gk


@unshuffle_backward_op.register_fake
def _(grad_out, row_visible, row_kind, row_of_visible, need_mask, need_type):
    return (grad_out.new_empty(row_of_visible.shape[0], grad_out.shape[-1]),
            grad_out.new_empty(4, grad_out.shape[-1], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos, row_of_visible = inputs
    ctx.save_for_backward(row_visible, row_kind, row_of_visible)
    ctx.meta = (visible.dtype, mask_tokens.dtype, mask_tokens.shape,
                None if type_embeddings is None else (type_embeddings.dtype, type_embeddings.shape))


def _backward(ctx, grad_out):
    row_visible, row_kind, row_of_visible = ctx.saved_tensors
    vis_dtype, mask_dtype, mask_shape, type_meta = ctx.meta
    need_mask = ctx.needs_input_grad[1]
    need_type = type_meta is not None and ctx.needs_input_grad[2]
    gv, gk = unshuffle_backward_op(grad_out, row_visible, row_kind, row_of_visible, need_mask, need_type)
    grad_mask = gk[:2].to(mask_dtype).view(mask_shape) if need_mask else None
    grad_type = gk[2:].to(type_meta[0]).view(type_meta[1]) if need_type else None
    return gv.to(vis_dtype), grad_mask, grad_type, None, None, None, None, None


unshuffle_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# drop-in
# ----------------------------------------------------------------------------------------------
def unshuffle(visible: torch.Tensor, mask_tokens: torch.Tensor, type_embeddings: Optional[torch.Tensor],
              pos_table: Optional[torch.Tensor], row_visible: torch.Tensor, row_kind: torch.Tensor,
              row_pos: torch.Tensor, row_of_visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoder input rows [R, D] (see m3ae_engine.ops.reference.unshuffle). visible [T, D]; mask_tokens and
    type_embeddings [2, D]; pos_table [P, D] (no gradient); row maps [R]; row_of_visible [T] (decoder row
    fed by each visible row, -1 none) is built here when not given. Each visible row may feed at most
    one decoder row (true of every masking plan): the backward is a gather, not a scatter-add."""
    check(visible.dim() == 2, f"{_OP}: visible must be [T, D], got {tuple(visible.shape)}")
    t, d = visible.shape
    check_float("visible", _OP, visible)
    check(tuple(mask_tokens.shape) == (2, d), f"{_OP}: mask_tokens must be [2, {d}], got {tuple(mask_tokens.shape)}")
    check_float("mask_tokens", _OP, mask_tokens)
    if type_embeddings is not None:
        check(tuple(type_embeddings.shape) == (2, d),
              f"{_OP}: type_embeddings must be [2, {d}], got {tuple(type_embeddings.shape)}")
        check_float("type_embeddings", _OP, type_embeddings)
    if pos_table is not None:
        check(pos_table.dim() == 2 and pos_table.shape[1] == d,
              f"{_OP}: pos_table must be [P, {d}], got {tuple(pos_table.shape)}")
        check_float("pos_table", _OP, pos_table)
        pos_table = pos_table.detach()  # fixed sin-cos table: no gradient by contract
    check_index("row_visible", _OP, row_visible)
    r = row_visible.numel()
    check_index("row_kind", _OP, row_kind, r)
    check_index("row_pos", _OP, row_pos, r)
    check_device(_OP, visible, mask_tokens=mask_tokens, type_embeddings=type_embeddings, pos_table=pos_table,
                 row_visible=row_visible, row_kind=row_kind, row_pos=row_pos, row_of_visible=row_of_visible)
    if row_of_visible is None:
        row_of_visible = decoder_row_of_visible(row_visible, row_kind, t)
    check_index("row_of_visible", _OP, row_of_visible, t)
    return unshuffle_op(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos,
                        row_of_visible)
