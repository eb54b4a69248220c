"""M3AE encoder -> a timm VisionTransformer state dict and the `timm.create_model` call that takes it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..model.config import M3AEConfig
from ..model.pos_embed import sincos_2d
from ..storage.atomic import atomic_write, atomic_write_text
from .mae import linear_to_conv_patch_weight
from .report import ConversionError

TIMM_SIZES = {384: "small", 768: "base", 1024: "large", 1280: "huge"}


def timm_model_spec(config: M3AEConfig) -> dict:
    """Name and kwargs for `timm.create_model(name, **kwargs)` matching the exported encoder."""
    size = TIMM_SIZES.get(config.emb_dim, "base")
    kwargs = dict(img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.emb_dim,
                  depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                  class_token=True, global_pool="token", qkv_bias=True,
                  act_layer="gelu_tanh" if config.gelu == "tanh" else "gelu")
    return {"model_name": f"vit_{size}_patch{config.patch_size}_{config.image_size}",
            "base_model_name": f"vit_{size}_patch{config.patch_size}_224", "kwargs": kwargs,
            "mean": list(config.image_mean), "std": list(config.image_std),
            "input": "float images (x/255 - mean) / std"}


def to_timm_state_dict(sd: Dict[str, torch.Tensor], config: M3AEConfig) -> Dict[str, torch.Tensor]:
    """Encoder -> timm VisionTransformer state dict (no head). The encoder image type embedding is folded
    into pos_embed (image rows), the CLS row of pos_embed is zero: timm's CLS features equal
    `M3AE.forward_representation(image)[:, 0]` for the same normalised input."""
    def get(name):
        if name not in sd:
            raise ConversionError(f"state dict lacks {name!r}")
        return sd[name].detach().float().cpu()

    d = config.emb_dim
    pos = sincos_2d(d, config.grid_size)
    if config.use_type_embedding:
        pos = pos + get("encoder_image_type_embedding").reshape(1, d)
    out = {"cls_token": get("cls_token").reshape(1, 1, d).clone(),
           "pos_embed": torch.cat([torch.zeros(1, d), pos])[None].contiguous(),
           "patch_embed.proj.weight": linear_to_conv_patch_weight(get("image_embedding.weight"),
                                                                  config.patch_size, config.in_channels),
           "patch_embed.proj.bias": get("image_embedding.bias").clone(),
           "norm.weight": get("encoder_norm.weight").clone(), "norm.bias": get("encoder_norm.bias").clone()}
    for k in sd:
        if k.startswith("encoder.") and k.split(".")[1].isdigit():
            out["blocks." + k[len("encoder."):]] = get(k).clone()
    return out


def save_timm(sd: Dict[str, torch.Tensor], config: M3AEConfig, out: Path) -> Tuple[int, dict]:
    """Write the timm state dict to OUT (.safetensors, else a torch file {'model': sd}) and the
    `timm.create_model` spec to timm_config.json beside it, atomically. Returns (tensors written, spec)."""
    tsd = to_timm_state_dict(sd, config)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in tsd.items()}, str(tmp)))
    else:
        atomic_write(out, lambda tmp: torch.save({"model": tsd}, str(tmp)))
    spec = timm_model_spec(config)
    atomic_write_text(out.parent / "timm_config.json", json.dumps(spec, indent=2))
    return len(tsd), spec
