"""Synthetic image-caption data: procedural scenes whose captions describe them.

Each image holds one to three shapes (circle, square, triangle, cross) of a colour, size and
position on a coloured background; the caption names them ("a small red circle at the top left
and a large blue square in the middle on a gray background"). Deterministic by (seed, index),
any size, no downloads: the default training data, and the text really carries image content.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .text_drop import TextDrop, tokenise_with_drop

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 220, 40),
    "purple": (150, 50, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
BACKGROUNDS = {"gray": (128, 128, 128), "dark": (40, 40, 50), "light": (210, 210, 200), "teal": (30, 120, 120)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.18, "medium": 0.28, "large": 0.40}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")


def _place(rng: np.random.Generator) -> Tuple[str, float, float]:
    r, c = rng.integers(3), rng.integers(3)
    where = "in the middle" if (r, c) == (1, 1) else f"at the {ROWS[r]} {COLS[c]}"
    return where, (c + 0.5) / 3.0, (r + 0.5) / 3.0


def _draw(img: np.ndarray, shape: str, colour, cx: float, cy: float, size: float) -> None:
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    x = (xx + 0.5) / w - cx
    y = (yy + 0.5) / h - cy
    half = size / 2
    if shape == "circle":
        m = x * x + y * y <= half * half
    elif shape == "square":
        m = (np.abs(x) <= half * 0.85) & (np.abs(y) <= half * 0.85)
    elif shape == "triangle":
        m = (y <= half) & (y >= -half) & (np.abs(x) <= (y + half) / 2)
    else:  # cross
        m = ((np.abs(x) <= half / 3) & (np.abs(y) <= half)) | ((np.abs(y) <= half / 3) & (np.abs(x) <= half))
    img[m] = colour


def make_sample(index: int, seed: int = 0, image_size: int = 256) -> Tuple[np.ndarray, str]:
    """(image uint8 [H, W, 3], caption) for one index; the same (seed, index) gives the same pair."""
    rng = np.random.default_rng([seed, index])
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    img = np.empty((image_size, image_size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[bg_name]
    img[:] = np.clip(img.astype(np.int16) + rng.integers(-12, 13, size=img.shape), 0, 255).astype(np.uint8)
    parts: List[str] = []
    used = set()
    for _ in range(int(rng.integers(1, 4))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        where, cx, cy = _place(rng)
        if where in used:
            continue
        used.add(where)
        _draw(img, shape, COLOURS[colour], cx, cy, SIZES[size])
        parts.append(f"a {size} {colour} {shape} {where}")
    caption = " and ".join(parts) + f" on a {bg_name} background"
    return img, caption


class SyntheticImageText(torch.utils.data.Dataset):
    """Map-style dataset of (uint8 image [3, H, W], caption)."""

    def __init__(self, size: int = 10000, image_size: int = 256, seed: int = 0):
        if size < 1:
            raise ValueError(f"synthetic dataset size must be >= 1, got {size}")
        self.size, self.image_size, self.seed = size, image_size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(index)
        img, caption = make_sample(index, self.seed, self.image_size)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), caption


class SyntheticBatches:
    """Endless batches {"image": uint8 [B,3,H,W], "text": int64 [B,L], "text_padding_mask": [B,L]} on the CPU.

    The text stays on the CPU: the model reads its padding to size packed sequences exactly.
    `state_dict()` / `load_state_dict()` give the position for exact resume.
    `paired_fraction` / `random_drop_text`: partial pairing as the official data options (text_drop.py);
    sample index `i` (of a dataset of `size`, else of the endless stream) is the official index.
    """

    def __init__(self, batch_size: int, image_size: int = 256, text_length: int = 64, seed: int = 0,
                 tokenizer=None, size: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 paired_fraction: float = 1.0, random_drop_text: float = 0.0):
        from ..model.tokenizer import default_tokenizer
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.tokenizer = tokenizer or default_tokenizer(text_length)
        self.size = size
        self.rank, self.world_size = rank, world_size
        self.text_drop = TextDrop(paired_fraction, random_drop_text, seed)
        self.step = 0

    def batch_at(self, step: int) -> Dict[str, torch.Tensor]:
        start = (step * self.world_size + self.rank) * self.batch_size
        pos = [start + i for i in range(self.batch_size)]  # positions in the global stream
        idx, epochs = (pos, [0] * len(pos)) if self.size is None else ([p % self.size for p in pos],
                                                                       [p // self.size for p in pos])
        samples = [make_sample(i, self.seed, self.image_size) for i in idx]
        image = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).contiguous()
        dropped = self.text_drop.flags(idx, epochs)
        text, pad, captions = tokenise_with_drop(self.tokenizer, [s[1] for s in samples], dropped)
        return {"image": image, "text": text, "text_padding_mask": pad, "caption": captions}

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        while True:
            batch = self.batch_at(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
