"""Attention probabilities of the encoder on unmasked inputs, and what they say about words and patches.

The model's attention backends (flash-attn, varlen, SDPA, xformers) return outputs, never the
probabilities. `encoder_attention` therefore re-runs the encoder on a plain path that keeps them:
the same modules and weights, the same token layout as `M3AE.forward_representation`
([CLS, Li image patches, Lt text positions], padded text positions masked as keys), attention written
out as softmax(q k^T / sqrt(Dh)). `max_encoder_difference` checks its final output against
`forward_representation`, so the maps belong to the computation the model really does.

From the per-layer, head-averaged matrices:
- `attention_rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): add the
  identity for the residual path, renormalise each row, multiply the layers (last layer on the left);
- `caption_words`: WordPiece tokens grouped into words ("##" pieces join the word before them), with
  special tokens and padding left out;
- `sample_maps`: for CLS and each word, its row of a matrix restricted to the image-patch columns,
  as a [G, G] grid (a word of several pieces averages their rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

SPECIAL_TOKENS = frozenset({"[PAD]", "[CLS]", "[SEP]", "[MASK]"})


@torch.no_grad()
def encoder_attention(model, image: torch.Tensor, text: Optional[torch.Tensor] = None,
                      text_padding_mask: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Encoder on unmasked inputs, float32, keeping each layer's attention probabilities.

    image [B, C, H, W] (uint8, or float already normalised); text [B, Lt] ids with its padding mask
    [B, Lt] (1 = padding), or None. Returns (x [B, S, D] after the final LayerNorm, probs: one
    [B, H, S, S] per encoder layer, rows = queries, columns = keys), S = 1 + Li (+ Lt)."""
    model._check_inputs(image, text, text_padding_mask)
    dev = model.cls_token.device
    with torch.autocast(dev.type, enabled=False):
        img = model.embed_image(image.to(dev))  # [B, Li, D]
        b, li, d = img.shape
        parts = [model.cls_token.float().expand(b, 1, d), img.float()]
        key_pad = torch.zeros(b, 1 + li, dtype=torch.bool, device=dev)
        if text is not None:
            parts.append(model.embed_text(text.to(dev)).float())  # [B, Lt, D]
            key_pad = torch.cat([key_pad, text_padding_mask.to(dev) > 0], 1)  # as the padded plan: pads are no keys
        x = torch.cat(parts, 1)  # [B, S, D]
        s = x.shape[1]
        probs = []
        for blk in model.encoder:
            h_heads = blk.attn.num_heads
            dh = d // h_heads
            qkv = blk.attn.qkv(blk.norm1(x)).view(b, s, 3, h_heads, dh)  # [B, S, 3, H, Dh] ([3][H][Dh] layout)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, S, Dh]
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)  # [B, H, S, S]
            scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            probs.append(p)
            out = torch.matmul(p, v).transpose(1, 2).reshape(b, s, d)  # [B, S, D]
            x = x + blk.attn.proj(out)
            x = x + blk.mlp(blk.norm2(x))
        x = model.encoder_norm(x)
    return x, probs


@torch.no_grad()
def max_encoder_difference(model, x: torch.Tensor, image: torch.Tensor, text: Optional[torch.Tensor] = None,
                           text_padding_mask: Optional[torch.Tensor] = None) -> float:
    """max |x - forward_representation(...)| over the rows that are real tokens (padded text rows are
    never keys: forward_representation calls their outputs meaningless), relative to max(1, max |x|)."""
    ref = model.forward_representation(image, text, text_padding_mask).float()  # [B, S, D]
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if text is not None:
        valid[:, x.shape[1] - text.shape[1]:] = text_padding_mask.to(x.device) <= 0
    diff = (x - ref.to(x.device)).abs().amax(-1)[valid]
    return float(diff.max()) / max(1.0, float(x[valid].abs().max()))


def head_average(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer [B, H, S, S] -> [L, B, S, S], the mean over heads."""
    return torch.stack([p.mean(1) for p in probs])


def attention_rollout(mean_attention: torch.Tensor) -> torch.Tensor:
    """[L, B, S, S] head-averaged attention -> [B, S, S] rollout: A_l = rownorm(attn_l + I),
    R = A_{L-1} ... A_1 A_0 (Abnar & Zuidema 2020; the identity stands for the residual path)."""
    eye = torch.eye(mean_attention.shape[-1], dtype=mean_attention.dtype, device=mean_attention.device)
    rollout = None
    for a in mean_attention:  # bottom layer first
        a = a + eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else torch.matmul(a, rollout)
    return rollout


def caption_words(ids: Sequence[int], padding: Sequence[float], id_to_token: Callable[[int], str]
                  ) -> List[Tuple[str, List[int]]]:
    """[(word, [text positions of its pieces])] in caption order. A WordPiece continuation ("##ing")
    joins the word before it; special tokens and padded positions are skipped (a continuation right
    after a skipped token starts a word of its own)."""
    words: List[Tuple[str, List[int]]] = []
    joinable = False  # the previous position was part of a word
    for pos, (i, pad) in enumerate(zip(ids, padding)):
        tok = id_to_token(int(i)) if float(pad) <= 0 else None
        if tok is None or tok in SPECIAL_TOKENS:
            joinable = False
            continue
        if tok.startswith("##") and joinable:
            label, positions = words[-1]
            words[-1] = (label + tok[2:], positions + [pos])
        else:
            words.append((tok, [pos]))
        joinable = True
    return words


@dataclass
class SampleMaps:
    """Heat maps of one sample. Row 0 is CLS, row 1 + w the w-th word."""
    labels: List[str]  # ["[CLS]", word, ...]
    layers: List[int]  # encoder layer of each layer map (0-based)
    layer_maps: np.ndarray  # [1 + W, len(layers), G, G] head-averaged attention to the image patches
    rollout_maps: np.ndarray  # [1 + W, G, G] rollout restricted to the image patches


def sample_maps(mean_attention: torch.Tensor, rollout: torch.Tensor, sample: int, num_patches: int,
                layers: Sequence[int], words: Sequence[Tuple[str, List[int]]]) -> SampleMaps:
    """Maps of sample `sample` from [L, B, S, S] head-averaged attention and its [B, S, S] rollout.
    A word's query row is the mean of its pieces' rows (text position p is token 1 + Li + p)."""
    g = int(round(num_patches ** 0.5))
    patches = slice(1, 1 + num_patches)
    query_rows = [[0]] + [[1 + num_patches + p for p in positions] for _, positions in words]

    def rows_to_maps(m: torch.Tensor) -> np.ndarray:  # m [S, S] -> [1 + W, G, G]
        out = torch.stack([m[r, patches].mean(0) for r in query_rows])
        return out.reshape(len(query_rows), g, g).float().cpu().numpy()

    per_layer = np.stack([rows_to_maps(mean_attention[l, sample]) for l in layers], 1) if layers else \
        np.zeros((len(query_rows), 0, g, g), np.float32)
    return SampleMaps(["[CLS]"] + [w for w, _ in words], list(layers), per_layer,
                      rows_to_maps(rollout[sample]))


def resolve_layers(spec: str, depth: int) -> List[int]:
    """'-1' / '0,3,-1' / 'all' -> 0-based layer indices; ValueError for an index outside the encoder."""
    spec = spec.strip()
    if spec == "all":
        return list(range(depth))
    out = []
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"--layers {spec!r}: {part!r} is not an integer (give e.g. '-1', '0,5,-1' or 'all')")
        if not -depth <= i < depth:
            raise ValueError(f"--layers {spec!r}: layer {i} is out of range, the encoder has {depth} layers "
                             f"(0..{depth - 1}, or -{depth}..-1 from the top)")
        j = i % depth
        if j not in out:
            out.append(j)
    return out
