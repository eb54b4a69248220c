"""facebookresearch/mae `.pth` checkpoints -> M3AE (image-only mode).

A conv patch embedding [D, C, p, p] becomes a Linear on (p, p, c)-flattened patches by permuting to
[D, p, p, C]; exact GELU, LayerNorm eps 1e-6, MAE's per-patch normalised target, ImageNet statistics. The
fixed sin-cos position tables are checked against ours and not stored.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from ..model.config import ENCODER_PRESETS, M3AEConfig
from ..model.pos_embed import sincos_2d
from .report import ConversionError, ConversionReport, target_shapes

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


# encoder width -> heads of the MAE presets (facebookresearch/mae .pth files carry no config)
HEADS_BY_WIDTH = {v["emb_dim"]: v["num_heads"] for k, v in ENCODER_PRESETS.items() if k != "tiny"}


def mae_config_from_state_dict(msd: Dict[str, torch.Tensor], **overrides) -> M3AEConfig:
    if "patch_embed.proj.weight" not in msd or "cls_token" not in msd:
        raise ConversionError("not an MAE state dict: needs 'patch_embed.proj.weight' and 'cls_token'; "
                              f"keys start with {sorted(msd)[:10]}")
    w = msd["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise ConversionError(f"patch_embed.proj.weight must be [D, C, p, p], got {tuple(w.shape)}")
    d, c, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max(int(k.split(".")[1]) for k in msd if k.startswith("blocks."))
    vals = dict(emb_dim=d, depth=depth, patch_size=p, in_channels=c, gelu="exact", layer_norm_eps=1e-6,
                use_type_embedding=False, norm_pix_loss=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                mlp_ratio=int(msd["blocks.0.mlp.fc1.weight"].shape[0] // d), image_size=224)
    if "pos_embed" in msd:
        g = int(round(math.sqrt(msd["pos_embed"].shape[1] - 1)))
        vals["image_size"] = g * p
    dec = [k for k in msd if k.startswith("decoder_blocks.")]
    if dec:
        vals["dec_depth"] = 1 + max(int(k.split(".")[1]) for k in dec)
        vals["dec_emb_dim"] = int(msd["decoder_embed.weight"].shape[0])
    vals.update({k: v for k, v in overrides.items() if v is not None})
    vals.setdefault("num_heads", HEADS_BY_WIDTH.get(d))
    if vals["num_heads"] is None:
        raise ConversionError(f"cannot infer heads for width {d}; pass --num-heads")
    return M3AEConfig(**vals)


def conv_to_linear_patch_weight(w: torch.Tensor) -> torch.Tensor:
    """[D, C, p, p] conv kernel -> [D, p*p*C] Linear weight on (p, p, c)-ordered patches."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def linear_to_conv_patch_weight(w: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    return w.reshape(w.shape[0], patch_size, patch_size, channels).permute(0, 3, 1, 2).contiguous()


def _fixed_pos(config: M3AEConfig, dim: int) -> torch.Tensor:
    """[1, 1 + L, dim] sin-cos table with a zero CLS row (MAE / timm layout)."""
    return torch.cat([torch.zeros(1, dim), sincos_2d(dim, config.grid_size)])[None]


def mae_to_state_dict(msd: Dict[str, torch.Tensor], config: M3AEConfig, pos_atol: float = 1e-4
                      ) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    report = ConversionReport("facebookresearch/mae")
    shapes = target_shapes(config)
    sd: Dict[str, torch.Tensor] = {}
    used = set()

    def take(src, dst, fn=None, required=True):
        if src not in msd:
            if required:
                report.missing.append(src)
            return
        used.add(src)
        t = msd[src].detach().float().cpu()
        t = fn(t) if fn else t
        if tuple(t.shape) != shapes[dst]:
            report.shape_mismatch.append(f"{src} {tuple(msd[src].shape)} -> {dst} expects {shapes[dst]}")
            return
        sd[dst] = t.clone()
        report.converted.append(dst)

    take("cls_token", "cls_token")
    take("patch_embed.proj.weight", "image_embedding.weight", conv_to_linear_patch_weight)
    take("patch_embed.proj.bias", "image_embedding.bias")
    names = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias")
    for i in range(config.depth):
        for n in names:
            take(f"blocks.{i}.{n}", f"encoder.{i}.{n}")
    take("norm.weight", "encoder_norm.weight")
    take("norm.bias", "encoder_norm.bias")
    has_decoder = "decoder_embed.weight" in msd
    if has_decoder:
        take("decoder_embed.weight", "decoder_input_projection.weight")
        take("decoder_embed.bias", "decoder_input_projection.bias")
        take("mask_token", "image_mask_embedding")
        for i in range(config.dec_depth):
            for n in names:
                take(f"decoder_blocks.{i}.{n}", f"decoder.{i}.{n}")
        for n in ("decoder_norm.weight", "decoder_norm.bias"):
            take(n, n)
        take("decoder_pred.weight", "decoder_image_output.weight")
        take("decoder_pred.bias", "decoder_image_output.bias")
    else:
        report.notes.append("encoder-only MAE checkpoint: decoder stays at initialisation")
    for src, dim in (("pos_embed", config.emb_dim), ("decoder_pos_embed", config.dec_emb_dim)):
        if src in msd:
            used.add(src)
            ref = _fixed_pos(config, dim)
            got = msd[src].detach().float().cpu()
            if tuple(got.shape) != tuple(ref.shape):
                report.shape_mismatch.append(f"{src} {tuple(got.shape)} expects the fixed table {tuple(ref.shape)}")
            elif (got - ref).abs().max() > pos_atol:
                report.shape_mismatch.append(f"{src} is not the fixed 2-D sin-cos table (max diff "
                                             f"{(got - ref).abs().max():.2e}); learned position embeddings "
                                             f"are not supported")
            else:
                report.notes.append(f"{src} matches the fixed sin-cos table (skipped)")
    report.unexpected = sorted(set(msd) - used)
    report.not_converted = sorted(set(shapes) - set(sd))
    return sd, report
