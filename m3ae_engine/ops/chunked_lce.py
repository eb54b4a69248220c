"""The chunk loop of the fused linear cross-entropy, shared by its Triton and CUDA backends.

Liger-Kernel's scheme (FusedLinearCrossEntropy): the N selected rows are processed in chunks; per chunk
  1. logits [c, Vp] = hidden_c @ weight.T                         cuBLAS, in the hidden dtype
  2. softmax_chunk (the backend's kernel): bias added in fp32, online-softmax log-sum-exp and argmax
     over the first V columns, weighted CE and "correct" per row, then (write_grad) the logits are
     overwritten IN PLACE with d loss / d logits = w_r * (softmax - onehot(t_r))
  3. grad_hidden_c = G @ weight, grad_weight += G.T @ hidden_c, grad_bias += G.sum(0)   cuBLAS
so the gradients are computed during the forward, while the chunk is in memory, and the backward only
scales them by the incoming scalar gradient. Peak extra memory: one chunk of logits (chunk_bytes,
whatever V is; the rows per chunk adapt) + an fp32 [V, D] weight-gradient accumulator.

The weight is zero-padded to Vp rows, a 16-byte multiple (V = 30522 is not): the logits rows get an
aligned leading dimension for cuBLAS and 16-byte loads in the kernels. The padded columns are never
read by the kernels; they hold zeros, so they add nothing to grad_hidden, and their rows of the
weight/bias gradients are cut off.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch

# logits memory per chunk: bf16 V = 30522 gives ~4,400 rows, so at M3AE shapes (N ~ 7,700) the
# matmuls run on 2 large chunks near the cuBLAS rate
CHUNK_BYTES = int(os.environ.get("M3AE_LCE_CHUNK_BYTES", 256 << 20))

# softmax_chunk(logits [c, Vp] (row stride Vp), bias fp32 [V] | None, targets int64 [c], row_weight fp32 [c],
#               row_loss fp32 [c] (out), row_correct fp32 [c] (out), V, write_grad) -> None
SoftmaxChunk = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, int, bool], None]


def padded_vocab(v: int, dtype: torch.dtype) -> int:
    align = 16 // (torch.finfo(dtype).bits // 8)  # elements per 16 bytes
    return -(-v // align) * align


def rows_per_chunk(n: int, vp: int, itemsize: int, chunk_rows: int = 0, chunk_bytes: Optional[int] = None) -> int:
    if chunk_rows > 0:
        return chunk_rows
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes  # read at call time (M3AE_LCE_CHUNK_BYTES)
    return max(1, min(n, budget // max(1, vp * itemsize)))


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 targets: torch.Tensor, row_weight: torch.Tensor, need_hidden: bool,
                                 need_weight: bool, need_bias: bool, softmax_chunk: SoftmaxChunk,
                                 chunk_rows: int = 0, chunk_bytes: Optional[int] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [], correct [] (both fp32 sums over rows), grad_hidden [N, D], grad_weight [V, D], grad_bias [V]):
    the gradients of the loss (None where not needed), in the dtypes of hidden / weight / bias.

    hidden [N, D] (its dtype is the matmul dtype), weight [V, D] (cast to it), bias [V] or None,
    targets [N] in [0, V), row_weight [N]."""
    n, d = hidden.shape
    v = weight.shape[0]
    cdt = hidden.dtype
    dev = hidden.device
    h = hidden.contiguous()
    vp = padded_vocab(v, cdt)
    wc = weight.to(cdt)
    if vp != v:
        wc = torch.nn.functional.pad(wc, (0, 0, 0, vp - v))
    wc = wc.contiguous()  # [Vp, D]
    b32 = bias.to(torch.float32).contiguous() if bias is not None else None
    t = targets.to(torch.int64).contiguous()
    rw = row_weight.to(torch.float32).contiguous()
    need_bias = need_bias and bias is not None
    write_grad = need_hidden or need_weight or need_bias
    row_loss = torch.empty(n, dtype=torch.float32, device=dev)
    row_correct = torch.empty(n, dtype=torch.float32, device=dev)
    g_h = torch.empty(n, d, dtype=cdt, device=dev) if need_hidden else None
    g_w = torch.zeros(vp, d, dtype=torch.float32, device=dev) if need_weight else None  # fp32 over chunks
    g_b = torch.zeros(vp, dtype=torch.float32, device=dev) if need_bias else None
    c = rows_per_chunk(n, vp, torch.finfo(cdt).bits // 8, chunk_rows, chunk_bytes)
    for s in range(0, n, c):
        e = min(n, s + c)
        hs = h[s:e]  # [c, D]
        logits = torch.mm(hs, wc.t())  # [c, Vp]; the bias is added in fp32 by the kernel
        softmax_chunk(logits, b32, t[s:e], rw[s:e], row_loss[s:e], row_correct[s:e], v, write_grad)
        # logits[:, :V] now hold d loss / d logits
        if need_hidden:
            torch.mm(logits, wc, out=g_h[s:e])
        if need_weight:
            if cdt == torch.float32:
                g_w.addmm_(logits.t(), hs)
            else:
                g_w += torch.mm(logits.t(), hs)  # [Vp, D]
        if need_bias:
            g_b += logits.sum(0, dtype=torch.float32)
    return (row_loss.sum(), row_correct.sum(), g_h,
            g_w[:v].to(weight.dtype) if need_weight else None,
            g_b[:v].to(bias.dtype) if need_bias else None)
