"""Partial pairing: captions dropped as the official `deterministic_drop_text` / `random_drop_text`.

The official ImageTextDataset (m3ae_public, data.py) drops the caption of dataset index `i` when
    float(i % 100) / 100. < deterministic_drop_text      (the same samples in every epoch)
or  np.random.rand() < random_drop_text                  (a fresh draw at every visit)
and a dropped sample gets ids all 0 and a padding mask all 1. Its per-sample text loss is then
0 / max(0, 1e-5) = 0 and still counts in the batch mean (the text loss is divided by the whole
batch), while the packed layout gives it no text tokens at all (encoder and decoder).

Here `paired_fraction` F is the share of samples that KEEP their caption: the deterministic drop
fraction is 1 - F (rounded to 12 decimals, so F = 0.7 drops exactly indices 0..29 of each hundred and
not also 30 through 1 - 0.7 = 0.30000000000000004). The index is the sample's index in its dataset
(shards: its position in the shard list's sample table, synthetic: its sample index), independent of
shuffling, ranks and resume. The random draw is keyed by (seed, epoch, index) instead of a global
numpy stream, so 2 ranks drop what 1 rank drops and a resumed run drops what the uninterrupted did.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch

from ..model.tokenizer import PAD_ID

_RANDOM_DROP_TAG = 29  # keeps the random-drop stream apart from crops and shuffles of the same seed


def check_fractions(paired_fraction: float, random_drop_text: float) -> None:
    if not (isinstance(paired_fraction, (int, float)) and 0.0 <= paired_fraction <= 1.0):
        raise ValueError(f"paired_fraction must be in [0, 1], got {paired_fraction!r}")
    if not (isinstance(random_drop_text, (int, float)) and 0.0 <= random_drop_text <= 1.0):
        raise ValueError(f"random_drop_text must be in [0, 1], got {random_drop_text!r}")


class TextDrop:
    """Which samples lose their caption; `apply` turns their token rows into pure padding."""

    def __init__(self, paired_fraction: float = 1.0, random_drop_text: float = 0.0, seed: int = 0):
        check_fractions(paired_fraction, random_drop_text)
        self.paired_fraction, self.random_drop_text, self.seed = float(paired_fraction), float(random_drop_text), seed
        self.deterministic_drop_text = round(1.0 - self.paired_fraction, 12)

    @property
    def active(self) -> bool:
        return self.deterministic_drop_text > 0 or self.random_drop_text > 0

    def drops(self, index: int, epoch: int) -> bool:
        """The official rule for dataset index `index`, visited in epoch `epoch`."""
        return self.flags([index], [epoch])[0]

    def flags(self, indices: Sequence[int], epochs: Sequence[int]) -> list:
        """drops() for a batch: one numpy pass (a per-sample generator cost ~30 us a sample on the
        loader's main thread)."""
        idx = np.asarray(list(indices), dtype=np.int64)
        dropped = (idx % 100).astype(np.float64) / 100.0 < self.deterministic_drop_text
        if self.random_drop_text > 0:
            u = keyed_uniform(self.seed, np.asarray(list(epochs), dtype=np.int64), idx)
            dropped |= u < self.random_drop_text
        return dropped.tolist()


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective mix of uint64 words."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_uniform(seed: int, epochs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) draw per (seed, epoch, index), the same whoever asks (any rank, after a resume):
    the key words are chained through SplitMix64, the top 53 bits make the double."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        x = _splitmix64(np.full(indices.shape, np.uint64(seed % 2**64)) + _GOLDEN * np.uint64(_RANDOM_DROP_TAG))
        x = _splitmix64(x ^ (epochs.astype(np.uint64) + _GOLDEN))
        x = _splitmix64(x ^ (indices.astype(np.uint64) + _GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def drop_text_rows(text: torch.Tensor, padding_mask: torch.Tensor, dropped: Sequence[bool]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """text [B, L] ids, padding_mask [B, L] (1 = padding) -> the same with the dropped rows as the official
    code writes them: ids 0 (PAD), mask all 1. New tensors; the inputs are not modified."""
    rows = torch.tensor(list(dropped), dtype=torch.bool)
    if not rows.any():
        return text, padding_mask
    text, padding_mask = text.clone(), padding_mask.clone()
    text[rows] = PAD_ID
    padding_mask[rows] = 1
    return text, padding_mask


def tokenise_with_drop(tokenizer, captions: Sequence[str], dropped: Sequence[bool]):
    """(ids [B, L], padding_mask [B, L], captions with "" for the dropped ones)."""
    text, pad = tokenizer.encode_batch(list(captions))
    text, pad = drop_text_rows(text, pad, dropped)
    return text, pad, ["" if d else c for c, d in zip(captions, dropped)]
