"""The official run flags (`variant`) <-> M3AEConfig.

`m3ae_main.py` stores `variant = get_user_flags(FLAGS, FLAGS_DEF)`: top-level flags by name (`patch_size`,
`text_loss_weight`, ...) and each ConfigDict flattened with its name as prefix (`m3ae.emb_dim`,
`data.image_size`, ...). The model config is what `MaskedMultimodalAutoencoder.get_default_config(FLAGS.m3ae)`
resolves: the flags update the defaults, then a `model_type` preset (`get_transformer_by_config`) overwrites
the dims -- so with `m3ae.model_type=base` the stored `m3ae.emb_dim` (1024, the default) is stale and the
model is 768 wide. `mae_main.py` uses the prefix `mae.` for the same fields and `cc12m_data.` /
`imagenet_data.` (its `dataset` flag) for the data ones.

The constants below are copied from young-geng/m3ae_public (m3ae/model.py, m3ae/data.py, m3ae/m3ae_main.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from ..model.config import CC12M_MEAN, CC12M_STD

# MaskedMultimodalAutoencoder.get_default_config()
OFFICIAL_MODEL_DEFAULTS = dict(model_type=None, emb_dim=1024, dec_emb_dim=512, depth=24, dec_depth=8,
                               num_heads=16, dec_num_heads=16, mlp_ratio=4, output_head_depth=0, att_drop=0.0,
                               drop=0.0, drop_path=0.0, image_mask_ratio=0.75, text_mask_ratio=0.75,
                               use_type_embedding=True)
# get_transformer_by_config(model_type, config): the fields each preset sets
_PRESET_FIELDS = ("emb_dim", "dec_emb_dim", "depth", "dec_depth", "num_heads", "dec_num_heads", "mlp_ratio")
OFFICIAL_PRESETS = {
    "small": (384, 512, 12, 8, 6, 16, 4),
    "base": (768, 512, 12, 8, 12, 16, 4),
    "large": (1024, 512, 24, 8, 16, 16, 4),
    "huge": (1280, 512, 32, 8, 16, 16, 4),
    "debug": (1024, 512, 2, 2, 16, 16, 4),
}
# m3ae_main.py FLAGS_DEF (the ones that change what the model computes or is trained on)
OFFICIAL_FLAG_DEFAULTS = dict(patch_size=16, discretized_image=False, image_all_token_loss=False,
                              text_all_token_loss=False, image_loss_weight=1.0, text_loss_weight=0.1,
                              unpaired_text_loss_weight=0.0)
# ImageTextDataset image_normalization modes (data.py)
OFFICIAL_NORMALIZATIONS = {"cc12m": (CC12M_MEAN, CC12M_STD),
                           "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                           "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}

# M3AEConfig field <- official model-config key (under the `m3ae.` / `mae.` prefix)
MODEL_KEYS = {f: f for f in ("emb_dim", "depth", "num_heads", "dec_emb_dim", "dec_depth", "dec_num_heads",
                             "mlp_ratio", "output_head_depth", "use_type_embedding", "image_mask_ratio",
                             "text_mask_ratio")}
# M3AEConfig field <- official top-level / data flag
FLAG_KEYS = {"patch_size": "patch_size", "image_loss_weight": "image_loss_weight",
             "text_loss_weight": "text_loss_weight", "unpaired_text_loss_weight": "unpaired_text_loss_weight",
             "image_all_token_loss": "image_all_token_loss", "text_all_token_loss": "text_all_token_loss",
             "image_size": "data.image_size", "text_length": "data.tokenizer_max_length"}
# fields that change how the model is trained, not what its tensors are: the official defaults apply when a
# checkpoint does not state them (a bare parameter tree)
TRAINING_FIELDS = {**{f: OFFICIAL_MODEL_DEFAULTS[f] for f in ("image_mask_ratio", "text_mask_ratio")},
                   **{f: OFFICIAL_FLAG_DEFAULTS[f] for f in ("image_loss_weight", "text_loss_weight",
                                                             "unpaired_text_loss_weight", "image_all_token_loss",
                                                             "text_all_token_loss")}}


class VariantError(ValueError):
    """The variant states something M3AEConfig cannot represent, or names an unknown preset."""


def model_prefix(variant: dict) -> str:
    for prefix in ("m3ae.", "mae."):
        if any(k.startswith(prefix) for k in variant):
            return prefix
    return "m3ae."


def data_prefix(variant: dict) -> str:
    """m3ae_main.py: `data.`; mae_main.py: `cc12m_data.` or `imagenet_data.`, as its `dataset` flag picks."""
    if any(k.startswith("data.") for k in variant) or variant.get("dataset") not in ("cc12m", "imagenet"):
        return "data."
    return f"{variant['dataset']}_data."


def fields_from_variant(variant: dict) -> Tuple[Dict[str, Any], Dict[str, str], List[str]]:
    """(M3AEConfig fields the variant states, the flag each came from, notes). Resolved as the official
    `get_default_config`: a `model_type` preset overrides the dims stored beside it."""
    prefix = model_prefix(variant)
    values: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    notes: List[str] = []
    for field, key in MODEL_KEYS.items():
        if prefix + key in variant:
            values[field], origin[field] = variant[prefix + key], prefix + key
    model_type = variant.get(prefix + "model_type")
    if model_type is not None:
        if model_type not in OFFICIAL_PRESETS:
            raise VariantError(f"{prefix}model_type={model_type!r} is not an official preset "
                               f"({', '.join(OFFICIAL_PRESETS)})")
        for field, v in zip(_PRESET_FIELDS, OFFICIAL_PRESETS[model_type]):
            if field in values and values[field] != v:
                notes.append(f"{prefix}{field}={values[field]} is overridden by {prefix}model_type={model_type!r} "
                             f"({field}={v}), as the official get_default_config does")
            values[field], origin[field] = v, f"{prefix}model_type={model_type!r}"
    data = data_prefix(variant)
    for field, key in FLAG_KEYS.items():
        key = data + key[len("data."):] if key.startswith("data.") else key
        if key in variant:
            values[field], origin[field] = variant[key], key
    if variant.get("discretized_image"):
        raise VariantError("discretized_image=True (VQGAN token targets) is not supported: the image head "
                           "predicts pixels here")
    norm = variant.get(data + "image_normalization")
    if norm is not None:
        if norm == "custom":
            try:
                mean, std = (tuple(float(x) for x in str(variant.get(f"{data}custom_image_{s}", "")).split("-"))
                             for s in ("mean", "std"))
            except ValueError as e:
                raise VariantError(f"{data}image_normalization='custom' with unreadable "
                                   f"{data}custom_image_mean/std: {e}") from e
        elif norm in OFFICIAL_NORMALIZATIONS:
            mean, std = OFFICIAL_NORMALIZATIONS[norm]
        else:
            raise VariantError(f"{data}image_normalization={norm!r} is not one of the official modes "
                               f"({', '.join(OFFICIAL_NORMALIZATIONS)}, custom)")
        values["image_mean"], values["image_std"] = mean, std
        origin["image_mean"] = origin["image_std"] = data + "image_normalization"
    for key in ("att_drop", "drop", "drop_path"):
        if variant.get(prefix + key):
            notes.append(f"{prefix}{key}={variant[prefix + key]}: m3ae_engine has no dropout (the weights "
                         f"convert exactly; training here runs without it)")
    return values, origin, notes


def variant_from_config(config) -> Tuple[Dict[str, Any], List[str]]:
    """M3AEConfig -> the official flattened flags that describe it (what official code would have been run
    with), and notes on settings the official code does not have. Raises VariantError for settings the
    official model computes differently (its outputs would not match)."""
    c = config
    bad = []
    if c.gelu != "tanh":
        bad.append(f"gelu={c.gelu!r} (official: tanh)")
    if abs(c.layer_norm_eps - 1e-6) > 1e-12:
        bad.append(f"layer_norm_eps={c.layer_norm_eps} (official: 1e-6)")
    if c.in_channels != 3:
        bad.append(f"in_channels={c.in_channels} (official: 3)")
    if bad:
        raise VariantError(f"the official model cannot reproduce this one: {', '.join(bad)}")
    variant: Dict[str, Any] = {}
    for field, key in FLAG_KEYS.items():
        variant[key] = getattr(c, field, False)  # the all-token flags are False where the config lacks them
    variant["discretized_image"] = False
    variant["m3ae.model_type"] = None
    for field, key in MODEL_KEYS.items():
        variant["m3ae." + key] = getattr(c, field, OFFICIAL_MODEL_DEFAULTS[key])
    for key in ("att_drop", "drop", "drop_path"):
        variant["m3ae." + key] = 0.0
    mean_std = (tuple(c.image_mean), tuple(c.image_std))
    for name, ms in OFFICIAL_NORMALIZATIONS.items():
        if all(abs(a - b) < 1e-7 for a, b in zip(sum(ms, ()), sum(mean_std, ()))):
            variant["data.image_normalization"] = name
            break
    else:
        variant["data.image_normalization"] = "custom"
        variant["data.custom_image_mean"] = "-".join(repr(float(v)) for v in c.image_mean)
        variant["data.custom_image_std"] = "-".join(repr(float(v)) for v in c.image_std)
    notes = []
    if c.mask_sharing != "batch":
        notes.append(f"mask_sharing={c.mask_sharing!r}: the official code draws one mask per batch (device)")
    if c.norm_pix_loss:
        notes.append("norm_pix_loss=True: the official M3AE has no per-patch normalised target")
    return variant, notes
