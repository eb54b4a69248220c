"""A timm VisionTransformer classifier whose encoder comes from an M3AE / MAE checkpoint, for fine-tuning.

The encoder goes through the timm export (`convert.to_timm_state_dict`), so drop path, the layer-decay
parameter groups and the augmentations are timm's own. After the blocks, the two reference recipes differ:

  head "m3ae"  official ViTClassifier (m3ae_public model.py): encoder LayerNorm -> pool -> a new LayerNorm
               -> Dense. In timm terms: `norm` kept, `fc_norm` = LayerNorm(eps 1e-6).
  head "mae"   facebookresearch/mae models_vit: pool "cls": norm -> CLS token -> Linear;
               pool "avg": mean of the patch tokens -> fc_norm -> Linear, the pretrained `norm` unused
               (timm's `fc_norm=True`, which makes `norm` an Identity).

pool "cls" takes the CLS token, "avg" the mean of the patch tokens (CLS excluded), in both heads.
Head init: "m3ae" as flax Dense (lecun_normal: truncated normal, std 1/sqrt(D), zero bias);
"mae" as main_finetune (trunc_normal std 2e-5, zero bias).
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn as nn

from ..model.config import M3AEConfig
from ..interop.timm_export import timm_model_spec, to_timm_state_dict

POOLS = {"cls": "token", "avg": "avg"}
HEADS = ("m3ae", "mae")
# flax truncated_normal: the std of a unit normal truncated to [-2, 2]; lecun_normal divides by it
_TRUNC_STD = 0.87962566103423978


def import_timm():
    """timm, or a one-line error: timm imports torchvision, whose ops only load beside a matching torch."""
    try:
        import timm
        import timm.data  # noqa: F401  (imports torchvision: its ops fail here when the builds mismatch)
        return timm
    except (ImportError, RuntimeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ImportError(f"fine-tuning needs timm and a torchvision built for this torch "
                          f"(pip install -e '.[eval]' beside a matching torchvision): {first}") from None


def vit_kwargs(config: M3AEConfig, pool: str, head: str, drop_path: float) -> dict:
    """VisionTransformer kwargs (JSON-friendly: act_layer by name) of the classifier."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {sorted(POOLS)}, got {pool!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    kw = dict(timm_model_spec(config)["kwargs"])
    kw.update(global_pool=POOLS[pool], drop_path_rate=float(drop_path), fc_norm=head == "mae" and pool == "avg")
    return kw


def create_vit(kwargs: dict, num_classes: int, head: str) -> nn.Module:
    """The VisionTransformer of `vit_kwargs` (fresh weights), with the m3ae head's extra LayerNorm."""
    timm = import_timm()
    from timm.models.vision_transformer import VisionTransformer
    kw = dict(kwargs, act_layer=timm.layers.get_act_layer(kwargs["act_layer"]))
    vit = VisionTransformer(num_classes=num_classes, **kw)
    if head == "m3ae":
        # timm keeps fc_norm an Identity when it does not replace norm; the official head adds one
        vit.fc_norm = nn.LayerNorm(vit.embed_dim, eps=1e-6)
    return vit


def build_classifier(m3ae_state_dict: Dict[str, torch.Tensor], config: M3AEConfig, num_classes: int,
                     pool: str = "cls", head: str = "m3ae", drop_path: float = 0.0):
    """(VisionTransformer with the encoder's weights and a fresh head, its kwargs). Raises ValueError
    if the exported encoder does not fill every encoder parameter of the ViT."""
    if num_classes < 2:
        raise ValueError(f"fine-tuning needs at least 2 classes, got {num_classes}")
    kwargs = vit_kwargs(config, pool, head, drop_path)
    vit = create_vit(kwargs, num_classes, head)
    tsd = to_timm_state_dict(m3ae_state_dict, config)
    if kwargs["fc_norm"]:  # MAE global pool: the pretrained final norm is not used (models_vit deletes it)
        tsd = {k: v for k, v in tsd.items() if not k.startswith("norm.")}
    res = vit.load_state_dict(tsd, strict=False)
    fresh = {k for k in vit.state_dict() if k.startswith(("head.", "fc_norm."))}
    if res.unexpected_keys or set(res.missing_keys) != fresh:
        raise ValueError(f"the encoder does not map onto the ViT: missing {sorted(set(res.missing_keys) - fresh)}, "
                         f"unexpected {res.unexpected_keys}")
    with torch.no_grad():
        if head == "mae":
            nn.init.trunc_normal_(vit.head.weight, std=2e-5)
        else:
            std = 1.0 / math.sqrt(vit.embed_dim) / _TRUNC_STD
            nn.init.trunc_normal_(vit.head.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(vit.head.bias)
        if not isinstance(vit.fc_norm, nn.Identity):
            nn.init.ones_(vit.fc_norm.weight)
            nn.init.zeros_(vit.fc_norm.bias)
    return vit, kwargs


LAYER_RULES = ("m3ae", "mae")


def layer_id(name: str, depth: int, rule: str) -> int:
    """Layer of a ViT parameter for layer-wise lr decay: block i is i + 1 in both references; the rest:
    mae   util/lr_decay.get_layer_id_for_vit: cls_token, pos_embed, patch_embed 0; norm, fc_norm, head
          depth + 1.
    m3ae  finetune_main.py name_to_layer_id, read on the official parameter names: cls_token and the
          encoder's final LayerNorm ('LayerNorm_0', matched there with 'patch_emb') 0; everything else
          -- image_embedding (our patch_embed), the encoder image type embedding (folded into our
          pos_embed; the sin-cos part is fixed there), the head's LayerNorm and Dense -- depth + 1.
    (timm's param_groups_layer_decay puts `norm` with the last block, which neither reference does.)"""
    top = name.split(".")[0]
    if top == "blocks":
        return int(name.split(".")[1]) + 1
    if rule == "mae":
        return 0 if top in ("cls_token", "pos_embed", "patch_embed") else depth + 1
    if rule == "m3ae":
        return 0 if top in ("cls_token", "norm") else depth + 1
    raise ValueError(f"layer rule must be one of {LAYER_RULES}, got {rule!r}")


def layer_decay_groups(vit: nn.Module, weight_decay: float, layer_decay: float, rule: str = "mae") -> list:
    """AdamW groups as timm's param_groups_layer_decay builds them (each with its 'lr_scale' =
    layer_decay ** (depth + 1 - layer_id); no weight decay on 1-D parameters and on
    vit.no_weight_decay(): pos_embed, cls_token), with the reference's layer ids (`layer_id`)."""
    depth = len(vit.blocks)
    skip = set(vit.no_weight_decay())
    groups = {}
    for name, p in vit.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth, rule)
        no_decay = p.ndim <= 1 or name in skip
        g = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                "lr_scale": layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
