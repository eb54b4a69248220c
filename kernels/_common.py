"""Helpers shared by the kernel files: launch shapes, input checks, a generic row gather.

Launch shapes: on a GPU a program handles a few rows x a whole row tile (~4K elements, enough to
keep the loads in flight); under the Triton interpreter (CPU CI) every program instance costs
~5 ms, so a program takes many rows at once (numpy vectorises the block).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def row_blocks(d: int, rows: int, max_block_d: int = 4096):
    """(BLOCK_R, BLOCK_D) for a [rows, d] row-wise kernel."""
    block_d = min(triton.next_power_of_2(max(d, 1)), max_block_d)
    budget = (1 << 16) if interpreting() else 4096
    block_r = max(1, min(budget // block_d, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_d


def reduce_rows_per_program(rows: int, block_r: int) -> int:
    """Rows one program reduces into a partial sum: the partials stay few, the grid stays wide."""
    if interpreting():
        return max(block_r, triton.next_power_of_2(max(rows, 1)))
    # ~1024 programs: several waves over 100+ SMs; the [P, ..., D] fp32 partials stay a few MB
    return max(block_r, min(1024, triton.next_power_of_2(triton.cdiv(max(rows, 1), 1024))))


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_float(name: str, op: str, t: torch.Tensor) -> None:
    check(t.dtype in FLOAT_DTYPES, f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_index(name: str, op: str, t: torch.Tensor, numel=None) -> None:
    check(t.dtype in INDEX_DTYPES, f"{op}: {name} must be int32 or int64, got {t.dtype}")
    check(t.dim() == 1, f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if numel is not None:
        check(t.numel() == numel, f"{op}: {name} must have {numel} entries, got {t.numel()}")


def check_device(op: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            check(t.device == ref.device, f"{op}: {name} is on {t.device}, expected {ref.device}")


def check_range(op: str, name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """lo <= t < hi. On a GPU the check runs asynchronously (no host sync: a device assert fires
    later); on the CPU it is exact and immediate."""
    if t.numel() == 0:
        return
    if t.is_cuda:
        torch._assert_async(((t >= lo) & (t < hi)).all(), f"{op}: {name} out of range [{lo}, {hi})")
        return
    mn, mx = int(t.min()), int(t.max())
    check(lo <= mn and mx < hi, f"{op}: {name} must lie in [{lo}, {hi}), found values in [{mn}, {mx}]")


@triton.jit
def gather_rows_kernel(src_ptr, idx_ptr, out_ptr, n_rows, D,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = src[idx[r]] if idx[r] >= 0 else 0; src [*, D], out [n_rows, D] (both contiguous)."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    idx = tl.load(idx_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    hit = idx >= 0
    idx = tl.where(hit, idx, 0)
    x = tl.load(src_ptr + idx[:, None] * D + cols[None, :], mask=hit[:, None] & cmask[None, :], other=0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], x.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[len(idx), D] rows of src (zero where idx < 0), one Triton launch."""
    n, d = idx.numel(), src.shape[-1]
    out = torch.empty(n, d, dtype=src.dtype, device=src.device)
    if n == 0 or d == 0:
        return out
    br, bd = row_blocks(d, n)
    gather_rows_kernel[(triton.cdiv(n, br), triton.cdiv(d, bd))](src, idx, out, n, d, BLOCK_R=br, BLOCK_D=bd)
    return out
