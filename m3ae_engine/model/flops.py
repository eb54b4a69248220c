"""Model FLOPs of one M3AE forward, counted matmul by matmul (DESIGN.md, "Tests and numbers").

One function, `m3ae_flops`, counts every matmul of the forward the way nanoGPT's `estimate_mfu`
does (2 FLOPs per multiply-add; LayerNorm, GELU, softmax, gathers and losses are not counted) and
multiplies by 3 for a training step (backward = 2x forward). The same function counts two
formulations from the batch's actual lengths:

* the model ("useful") FLOPs, `padded=False, heads_on_all=False`: the encoder over the VISIBLE
  tokens only (CLS + kept image patches + kept NON-PADDED text), the decoder over all non-padded
  positions (CLS + every patch + the caption's real tokens), the pixel head on masked patches only
  and the vocabulary head on masked non-padded text only. This is the work the loss needs, the
  same for every implementation: MFU is always computed from it.
* the executed FLOPs of the official / MAE-style formulation, `padded=True, heads_on_all=True`:
  every sample padded to the full text length (padding masked out of attention but still computed),
  the pixel head on ALL patches and the vocabulary head on ALL text positions (`benchmarks/
  reference_model.py`). `padded=True, heads_on_all=False` is the engine's padded layout.

Per sample and layer with N tokens of width D (MLP ratio r) in a sequence of length S:
  qkv 2*N*D*3D + proj 2*N*D*D + MLP 2*2*N*D*rD,   attention QK^T 2*S*S*D + AV 2*S*S*D.
Embedding lookups cost no FLOPs; the patch embedding is a Linear over all Li patches (computed
before masking, as in the official code and MAE).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

from .config import M3AEConfig

Lengths = Union[torch.Tensor, Sequence[float], None]


def _as_float_tensor(x) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1).cpu()


def m3ae_flops(config: M3AEConfig, text_lengths: Lengths = None, *, has_image: bool = True,
               kept_text: Lengths = None, padded: bool = False, heads_on_all: bool = False,
               training: bool = True, breakdown: bool = False) -> Union[float, Dict[str, float]]:
    """FLOPs per sample (averaged over the batch) of one forward (x3 with `training`).

    config: the model's M3AEConfig (sizes and mask ratios).
    text_lengths: [B] non-padded caption lengths of the batch (`(1 - text_padding_mask).sum(1)`),
        or None for an image-only (MAE) batch.
    has_image: False for a text-only batch.
    kept_text: [B] kept NON-PADDED text tokens per sample (exact, from a masking plan). Default: the
        expectation n * Kt / Lt (Kt of the Lt positions are kept uniformly at random, padding included).
    padded: encoder/decoder over the padded lengths (1 + Ki + Kt and 1 + Li + Lt) instead of the real ones.
    heads_on_all: pixel head on all Li patches and vocab head on all Lt positions instead of the loss rows
        (masked positions; all patches / all non-padded tokens with config.image/text_all_token_loss).
    breakdown: return {component: FLOPs per sample} (forward, or x3 with `training`) plus "total".
    """
    c = config
    d, dd, r, v, p = c.emb_dim, c.dec_emb_dim, c.mlp_ratio, c.vocab_size, c.patch_dim
    n = _as_float_tensor(text_lengths)
    has_text = n is not None
    if not (has_image or has_text):
        raise ValueError("m3ae_flops needs an image, a text, or both")
    if has_text and ((n < 0).any() or (n > c.text_length).any()):
        raise ValueError(f"text_lengths must be in [0, {c.text_length}]")
    batch = n.numel() if has_text else 1
    ones = torch.ones(batch, dtype=torch.float64)
    li = c.num_patches if has_image else 0
    ki = c.image_keep if has_image else 0
    lt = c.text_length if has_text else 0
    kt = c.text_keep if has_text else 0
    if has_text:
        kept = _as_float_tensor(kept_text) if kept_text is not None else n * kt / lt
        if kept.numel() != batch:
            raise ValueError(f"kept_text has {kept.numel()} entries for a batch of {batch}")
        masked_text = n - kept  # [B] masked non-padded tokens: the text head's rows
    else:
        kept = masked_text = n = torch.zeros(batch, dtype=torch.float64)

    # tokens per sample in each stack; sequence length = tokens (one sequence per sample)
    enc_tokens = (1 + ki + kt) * ones if padded else 1 + ki + kept  # [B]
    dec_tokens = (1 + li + lt) * ones if padded else 1 + li + n  # [B]

    def stack(tokens: torch.Tensor, width: int, depth: int):
        linear = depth * 2 * tokens * width * (3 * width + width + 2 * r * width)  # qkv, proj, fc1, fc2
        attention = depth * 2 * 2 * tokens * tokens * width  # QK^T and AV over all heads
        return float(linear.mean()), float(attention.mean())

    enc_linear, enc_attention = stack(enc_tokens, d, c.depth)
    dec_linear, dec_attention = stack(dec_tokens, dd, c.dec_depth)
    # the heads' rows: masked positions, or every one with the all-token losses (or heads_on_all)
    pixel_rows = li if (heads_on_all or c.image_all_token_loss) else li - ki
    text_rows = lt * ones if heads_on_all else (n if c.text_all_token_loss else masked_text)
    head_hidden = c.output_head_depth * 2 * dd * dd  # per row: the MLP head's Dd -> Dd layers before the last Linear
    parts = {
        "patch_embedding": 2.0 * li * p * d,
        "encoder_linear": enc_linear,
        "encoder_attention": enc_attention,
        "decoder_input_projection": float((2 * enc_tokens * d * dd).mean()),
        "decoder_linear": dec_linear,
        "decoder_attention": dec_attention,
        "pixel_head": pixel_rows * (2.0 * dd * p + head_hidden),
        "text_head": float((text_rows * (2 * dd * v + head_hidden)).mean()) if has_text else 0.0,
    }
    scale = 3.0 if training else 1.0
    parts = {k: scale * val for k, val in parts.items()}
    total = sum(parts.values())
    if breakdown:
        parts["total"] = total
        return parts
    return total


# bf16 dense tensor-core peak, TFLOP/s (vendor datasheets, no sparsity): the MFU denominator that
# DESIGN.md asks for. First match of the device name wins, so the specific names come first.
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4),
    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
]


def device_peak_tflops(name: str) -> Optional[float]:
    """bf16 dense peak of a GPU named `name` (torch.cuda.get_device_name), or None if unknown."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None

