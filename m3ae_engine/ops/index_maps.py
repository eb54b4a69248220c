"""Index maps between packed row layouts: scatters and inverses of gather maps, with no host sync.

The masking plans (m3ae_engine.model.masking) build their maps from these; the backends (torch, Triton,
CUDA) invert a plan's gather maps with them for the backward passes, so they live below both.
"""
from __future__ import annotations

import torch


def scatter_rows(dest: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, rows: int, fill,
                  dtype=torch.int32) -> torch.Tensor:
    """out[rows] = fill; out[dest[valid]] = values[valid], without boolean indexing (no sync)."""
    out = torch.full((rows + 1,), fill, dtype=dtype, device=dest.device)
    dest = torch.where(valid, dest, torch.full_like(dest, rows))
    out.scatter_(0, dest.reshape(-1), values.reshape(-1).to(dtype))
    return out[:rows]


def inverse_map(codes: torch.Tensor, lo: int, n: int) -> torch.Tensor:
    """inv [n] int32: inv[i] = r where codes[r] == lo + i, else -1 (one scatter, no host sync). Inverts a
    gather map (e.g. the packed row of each image token from enc_row_source)."""
    s = codes.long() - lo
    return scatter_rows(s, torch.arange(s.numel(), device=s.device), (s >= 0) & (s < n), n, -1)


def decoder_row_of_visible(row_visible: torch.Tensor, row_kind: torch.Tensor, n_visible: int) -> torch.Tensor:
    """[n_visible] int32: the decoder row fed by each visible (encoder) row, -1 if none; the inverse of
    the unshuffle's row_visible over the rows that read one (row_kind >= 0)."""
    vis = torch.where(row_kind >= 0, row_visible.long(), torch.full_like(row_visible, -1, dtype=torch.long))
    return inverse_map(vis, 0, n_visible)
