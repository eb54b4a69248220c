"""Fused linear + cross-entropy of the vocabulary head on selected rows, without [N, V] logits.

Contract: m3ae_engine.ops.reference.masked_linear_cross_entropy:
  (sum_r w_r * CE(hidden_r @ weight.T + bias, t_r),  sum_r w_r * [argmax_v logits_r == t_r])
with row_weight w carrying the official per-sample normalisation (1 / max(count, 1e-5) / B).

The chunk loop (cuBLAS matmuls, gradients computed during the forward, peak memory one logits chunk)
is m3ae_engine.ops.chunked_lce, shared with the CUDA backend; this file is its per-chunk kernel: one Triton
program per row (per few rows in the interpreter) runs an online-softmax log-sum-exp and argmax over V
blocks (bias added in fp32), writes the weighted CE and "correct", then sweeps the row again and
overwrites the logits IN PLACE with the gradient w_r * (softmax - onehot(t_r)). Gradients are only
computed for the inputs that require them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from m3ae_engine.ops.chunked_lce import chunked_linear_cross_entropy

from ._common import check, check_device, check_float, check_index, check_range, interpreting

_OP = "m3ae.masked_linear_cross_entropy"


@triton.jit
def _ce_chunk_kernel(logits_ptr, bias_ptr, tgt_ptr, w_ptr, loss_ptr, correct_ptr, n_rows, V, stride,
                     HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    # logits [n_rows, >= V] (row stride `stride`), its first V columns overwritten by the gradient when
    # WRITE_GRAD; bias [V] fp32; tgt, w [n_rows]; loss, correct [n_rows] fp32 (weighted)
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    base = logits_ptr + rows[:, None].to(tl.int64) * stride
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0).to(tl.int64)
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    # rows past the end start at 0 instead of -inf so that their (never stored) statistics stay NaN-free
    m = tl.where(rmask, float("-inf"), 0.0).to(tl.float32)
    d = tl.zeros([ROWS], dtype=tl.float32)
    best = tl.zeros([ROWS], dtype=tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        msk = rmask[:, None] & (cols < V)[None, :]
        x = tl.load(base + cols[None, :], mask=msk, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=cols < V, other=0.0)[None, :]
        bmax = tl.max(x, axis=1)
        barg = tl.argmax(x, axis=1).to(tl.int64) + start
        best = tl.where(bmax > m, barg, best)  # strict: the first maximum wins, as torch.argmax
        m_new = tl.maximum(m, bmax)
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(rmask, d, 1.0))
    x_t = tl.load(base + tgt[:, None], mask=rmask[:, None], other=0.0).to(tl.float32)
    x_t = tl.sum(x_t, axis=1)  # [ROWS]
    if HAS_BIAS:
        x_t += tl.load(bias_ptr + tgt, mask=rmask, other=0.0)
    tl.store(loss_ptr + rows, w * (lse - x_t), mask=rmask)
    tl.store(correct_ptr + rows, tl.where(best == tgt, w, 0.0), mask=rmask)
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            msk = rmask[:, None] & (cols < V)[None, :]
            x = tl.load(base + cols[None, :], mask=msk, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + cols, mask=cols < V, other=0.0)[None, :]
            p = tl.exp(x - lse[:, None])
            g = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * w[:, None]
            tl.store(base + cols[None, :], g.to(logits_ptr.dtype.element_ty), mask=msk)


def _softmax_chunk(logits, bias32, targets, row_weight, row_loss, row_correct, v, write_grad):
    """The per-chunk kernel for m3ae_engine.ops.chunked_lce: logits [c, Vp] in place."""
    c = logits.shape[0]
    # one row per program on a GPU (the V-long row is the unit of work, as Liger); a 4K-wide V block
    # over 8 warps keeps 16 values a thread in registers. The interpreter takes many rows per program.
    rows_per_prog = max(1, min(64, triton.next_power_of_2(c))) if interpreting() else 1
    block_v = min(triton.next_power_of_2(max(v, 1)), max(16, (1 << 15) // rows_per_prog) if interpreting() else 4096)
    _ce_chunk_kernel[(triton.cdiv(c, rows_per_prog),)](
        logits, bias32 if bias32 is not None else logits, targets, row_weight, row_loss, row_correct, c, v,
        logits.stride(0), HAS_BIAS=bias32 is not None, WRITE_GRAD=write_grad, ROWS=rows_per_prog,
        BLOCK_V=block_v, num_warps=8)


# ----------------------------------------------------------------------------------------------
# custom op (the gradients are extra outputs; the backward only scales them)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("m3ae::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            targets: torch.Tensor, row_weight: torch.Tensor, need_hidden_grad: bool,
                            need_weight_grad: bool, need_bias_grad: bool, chunk_rows: int
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [], accuracy [], grad_hidden [N, D] | [0], grad_weight [V, D] | [0], grad_bias [V] | [0])."""
    check_range(_OP, "targets", targets, 0, weight.shape[0])
    loss, correct, gh, gw, gb = chunked_linear_cross_entropy(
        hidden, weight, bias, targets, row_weight, need_hidden_grad, need_weight_grad, need_bias_grad,
        _softmax_chunk, chunk_rows=chunk_rows)
    empty = weight.new_empty(0)
    return (loss, correct, gh if gh is not None else hidden.new_empty(0), gw if gw is not None else empty,
            gb if gb is not None else empty.clone())


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, targets, row_weight, need_hidden_grad, need_weight_grad, need_bias_grad, chunk_rows):
    scalar = hidden.new_empty((), dtype=torch.float32)
    return (scalar, scalar.clone(),
            torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden_grad else hidden.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight_grad else weight.new_empty(0),
            torch.empty_like(bias) if need_bias_grad and bias is not None else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, row_weight, nh, nw, nb, _ = inputs
    _, _, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    ctx.flags = (nh, nw, nb and bias is not None)


def _backward(ctx, grad_loss, _grad_acc, _gh, _gw, _gb):
    gh, gw, gb = ctx.saved_tensors
    nh, nw, nb = ctx.flags
    scale = lambda g: g * grad_loss.to(g.dtype)  # noqa: E731  d(loss * s)/dx = s * dloss/dx
    return (scale(gh) if nh else None, scale(gw) if nw else None, scale(gb) if nb else None,
            None, None, None, None, None, None)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# drop-in
# ----------------------------------------------------------------------------------------------
def masked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                targets: torch.Tensor, row_weight: torch.Tensor, chunk_rows: int = 0
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weighted CE sum, weighted accuracy sum), float32 scalars; the accuracy carries no gradient.

    hidden [N, D], weight [V, D], bias [V] or None, targets [N] int in [0, V), row_weight [N] float
    (not differentiated). chunk_rows: rows per chunk (0 = as many as fit chunked_lce.CHUNK_BYTES)."""
    check(hidden.dim() == 2, f"{_OP}: hidden must be [N, D], got {tuple(hidden.shape)}")
    n, d = hidden.shape
    check(weight.dim() == 2 and weight.shape[1] == d, f"{_OP}: weight must be [V, {d}], got {tuple(weight.shape)}")
    v = weight.shape[0]
    check(v > 0, f"{_OP}: empty vocabulary")
    check_float("hidden", _OP, hidden)
    check(weight.dtype == hidden.dtype, f"{_OP}: weight is {weight.dtype} but hidden is {hidden.dtype}")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == v, f"{_OP}: bias must be [{v}], got {tuple(bias.shape)}")
        check_float("bias", _OP, bias)
    check_index("targets", _OP, targets, n)
    check(row_weight.dim() == 1 and row_weight.numel() == n and row_weight.is_floating_point(),
          f"{_OP}: row_weight must be a float [{n}] tensor, got {row_weight.dtype} {tuple(row_weight.shape)}")
    check(chunk_rows >= 0, f"{_OP}: chunk_rows must be >= 0, got {chunk_rows}")
    check_device(_OP, hidden, weight=weight, bias=bias, targets=targets, row_weight=row_weight)
    grad_on = torch.is_grad_enabled()
    loss, acc, _, _, _ = linear_cross_entropy_op(
        hidden, weight, bias, targets, row_weight.float(), grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad, chunk_rows)
    return loss, acc.detach()
