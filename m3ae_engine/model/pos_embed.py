"""Fixed sin-cos position embeddings, exactly as the official code (and MAE) compute them.

The 2-D grid follows `np.meshgrid(grid_w, grid_h)` ("w goes first"): the first half of the channels
encodes the column index, the second half the row index, for patch index = row * G + col.
"""
from __future__ import annotations

import functools

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions [M] float -> [M, embed_dim]: concat(sin(pos * omega), cos(pos * omega))."""
    assert embed_dim % 2 == 0, "sin-cos embedding needs an even width"
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device="cpu") / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # [D/2]
    out = positions.to("cpu", torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, embed_dim] for a square grid of patches in row-major order."""
    assert embed_dim % 4 == 0, "2-D sin-cos embedding needs a width divisible by 4"
    coords = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each
    emb_first = sincos_1d(embed_dim // 2, col.reshape(-1))  # official grid[0] = column index
    emb_second = sincos_1d(embed_dim // 2, row.reshape(-1))
    return torch.cat([emb_first, emb_second], dim=1)


@functools.lru_cache(maxsize=32)
def _cached_table(embed_dim: int, grid_size: int, text_length: int) -> torch.Tensor:
    parts = []
    if grid_size > 0:
        parts.append(sincos_2d(embed_dim, grid_size))
    if text_length > 0:
        parts.append(sincos_1d(embed_dim, torch.arange(text_length, dtype=torch.float64, device="cpu")))
    return torch.cat(parts, 0) if parts else torch.zeros(0, embed_dim, device="cpu")


@functools.lru_cache(maxsize=64)
def _table_on(embed_dim: int, grid_size: int, text_length: int, device: str) -> torch.Tensor:
    return _cached_table(embed_dim, grid_size, text_length).to(device)


def position_table(embed_dim: int, grid_size: int, text_length: int, device=None) -> torch.Tensor:
    """[G*G + Lt, D] float32: image rows first (2-D), then text rows (1-D). CLS has no row.

    Cached per device: a fresh host-to-device copy of pageable memory would wait for the stream.
    """
    # no device: the default device (honours `with torch.device("cuda"):` model construction)
    dev = torch.device(device) if device is not None else torch.get_default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _table_on(embed_dim, grid_size, text_length, str(dev))
