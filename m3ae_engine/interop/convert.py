"""Checkpoint conversion and loading: official M3AE (JAX/Flax pickles), facebookresearch/mae `.pth`,
timm export, safetensors in and out.

    python -m m3ae_engine.convert m3ae-to-torch  model.pkl  OUT_DIR
    python -m m3ae_engine.convert torch-to-m3ae  CKPT       OUT.pkl
    python -m m3ae_engine.convert mae-to-torch   mae_visualize_vit_large.pth OUT_DIR
    python -m m3ae_engine.convert to-timm        CKPT       OUT.safetensors
    python -m m3ae_engine.convert inspect        ANY_CHECKPOINT

OUT_DIR receives `model.safetensors` + `config.json`, the layout `train.py --output-dir` writes, which
`load_model` (and every eval command) reads. CKPT is such a directory, a training checkpoint directory
(`RUN/checkpoints/step_N`), a `.safetensors` file with a `config.json` beside it, a torch file, an
official pickle or an MAE `.pth`.

Official pickles (as `m3ae_main.py` writes them, optimizer and cloudpickled optax functions included) are
read without JAX/flax and without running code from the file (official_pickle.py). Their model config
comes from the checkpoint's own flags (`variant`, resolved as the official `get_default_config`:
official_variant.py) and is checked against the tensor shapes; what neither states is an error that names
the flag to pass (`--num-heads`, `--image-size`, ...).

Numerics (facts of the sources):
- Flax Dense kernels are [in, out]; a torch Linear weight is kernel.T. The official qkv Dense lays its
  output features out as (3, heads, head_dim), exactly as our `Attention.qkv`, so no permutation.
- Patches are flattened in (p, p, c) order; a conv patch embedding [D, C, p, p] becomes a Linear on
  flattened patches by permuting to [D, p, p, C].
- LayerNorm eps 1e-6; GELU tanh for official M3AE, exact GELU for facebookresearch/mae.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..storage.atomic import atomic_write, atomic_write_text
from ..model.config import ENCODER_PRESETS, ConfigError, M3AEConfig
from ..model.heads import official_head_keys
from .official_pickle import OfficialCheckpointError, read_official_checkpoint, write_official_pickle
from .official_flags import TRAINING_FIELDS, VariantError, fields_from_variant, variant_from_config
from ..model.pos_embed import sincos_2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# encoder width -> heads of the MAE presets (facebookresearch/mae .pth files carry no config)
HEADS_BY_WIDTH = {v["emb_dim"]: v["num_heads"] for k, v in ENCODER_PRESETS.items() if k != "tiny"}


class ConversionError(ValueError):
    """A checkpoint cannot be converted: missing, unexpected or mis-shaped entries, or an unknown format."""


# ---------------------------------------------------------------------------------------------
# conversion report
# ---------------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    source: str
    about: List[str] = field(default_factory=list)  # what the source is: step, flags, optimizer, ...
    step: Optional[int] = None  # training step the source records, if any
    converted: List[str] = field(default_factory=list)  # target names filled from the source
    missing: List[str] = field(default_factory=list)  # required source entries that are absent
    unexpected: List[str] = field(default_factory=list)  # source entries nothing maps to
    shape_mismatch: List[str] = field(default_factory=list)  # "name: source shape vs expected"
    not_converted: List[str] = field(default_factory=list)  # target params left at init (by design)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def __str__(self) -> str:
        def block(title, items, limit=40):
            if not items:
                return []
            shown = [f"    {x}" for x in items[:limit]]
            if len(items) > limit:
                shown.append(f"    ... and {len(items) - limit} more")
            return [f"  {title} ({len(items)}):"] + shown

        lines = [f"source: {self.source}"] + [f"  {a}" for a in self.about]
        lines += [f"conversion: {len(self.converted)} tensors converted"]
        lines += block("MISSING in the source", self.missing)
        lines += block("UNEXPECTED in the source", self.unexpected)
        lines += block("SHAPE MISMATCH", self.shape_mismatch)
        lines += block("left at initialisation (not in this source)", self.not_converted, 12)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_errors(self, allow_unexpected: bool = False) -> None:
        """One line: how many tensors are missing / unexpected / mis-shaped, with the first of each (the
        report, `str(self)` or `inspect`, lists them all)."""
        groups = [("missing", self.missing), ("mis-shaped", self.shape_mismatch)]
        if not allow_unexpected:
            groups.append(("unexpected", self.unexpected))
        parts = [f"{len(items)} {what} ({'; '.join(items[:2])}{'; ...' if len(items) > 2 else ''})"
                 for what, items in groups if items]
        if parts:
            raise ConversionError(f"{self.source}: cannot convert: {', '.join(parts)} tensors")


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


def flatten_tree(tree: dict, prefix: str = "") -> Dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_tree(v, name))
        else:
            out[name] = np.asarray(v)
    return out


def unflatten_tree(flat: Dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


# ---------------------------------------------------------------------------------------------
# official M3AE <-> M3AE names
# ---------------------------------------------------------------------------------------------
TEXT_OFFICIAL = ("text_embedding/", "encoder_text_type_embedding", "decoder_text_type_embedding",
                 "text_mask_embedding", "decoder_text_output/")


def official_name_map(config: M3AEConfig, with_text: bool = True) -> List[Tuple[str, str, str]]:
    """[(official name, torch name, kind)], kind 'dense' = kernel transposed, 'copy' = same layout."""
    m: List[Tuple[str, str, str]] = []

    def dense(src, dst):
        m.append((f"{src}/kernel", f"{dst}.weight", "dense"))
        m.append((f"{src}/bias", f"{dst}.bias", "copy"))

    def ln(src, dst):
        m.append((f"{src}/scale", f"{dst}.weight", "copy"))
        m.append((f"{src}/bias", f"{dst}.bias", "copy"))

    dense("image_embedding", "image_embedding")
    m.append(("text_embedding/embedding", "text_embedding.weight", "copy"))
    if config.use_type_embedding:
        for n in ("encoder_image_type_embedding", "encoder_text_type_embedding",
                  "decoder_image_type_embedding", "decoder_text_type_embedding"):
            m.append((n, n, "copy"))
    for n in ("cls_token", "image_mask_embedding", "text_mask_embedding"):
        m.append((n, n, "copy"))
    for stack, depth in (("encoder", config.depth), ("decoder", config.dec_depth)):
        for i in range(depth):
            s, t = f"{stack}/Block_{i}", f"{stack}.{i}"
            ln(f"{s}/LayerNorm_0", f"{t}.norm1")
            dense(f"{s}/Attention_0/Dense_0", f"{t}.attn.qkv")
            dense(f"{s}/Attention_0/Dense_1", f"{t}.attn.proj")
            ln(f"{s}/LayerNorm_1", f"{t}.norm2")
            dense(f"{s}/TransformerMLP_0/fc1", f"{t}.mlp.fc1")
            dense(f"{s}/TransformerMLP_0/fc2", f"{t}.mlp.fc2")
        ln(f"{stack}/LayerNorm_0", f"{stack}_norm")
    dense("decoder_input_projection", "decoder_input_projection")
    for head in ("decoder_image_output", "decoder_text_output"):  # official MLP heads (Dense_0 alone at depth 0)
        m += [(src, dst, "dense" if transpose else "copy")
              for dst, src, transpose in official_head_keys(head, config.output_head_depth)]
    if not with_text:
        m = [e for e in m if not e[0].startswith(TEXT_OFFICIAL)]
    return m


def _count_blocks(flat, stack: str) -> int:
    idx = {int(mt.group(1)) for k in flat for mt in [re.match(rf"{stack}/Block_(\d+)/", k)] if mt}
    return max(idx) + 1 if idx else 0


def _head_depth(flat, head: str) -> Optional[int]:
    """k of an official MLP head (`Dense_0..Dense_k`), None if the head is absent."""
    dense = {int(mt.group(1)) for k in flat for mt in [re.match(rf"{head}/Dense_(\d+)/kernel$", k)] if mt}
    return max(dense) if dense else None


def official_shape_fields(flat: Dict[str, np.ndarray]) -> Tuple[Dict[str, object], Dict[str, str]]:
    """The M3AEConfig fields the tensors of an official tree determine, and the tensor that shows each."""
    def need(name):
        if name not in flat:
            raise ConversionError(f"official checkpoint lacks {name!r}, needed to read the architecture; "
                                  f"it holds {sorted(flat)[:12]}...")
        return flat[name]

    fc1 = "encoder/Block_0/TransformerMLP_0/fc1/kernel"
    d = int(need("cls_token").shape[-1])
    patch_dim = int(need("image_embedding/kernel").shape[0])
    p = int(round(math.sqrt(patch_dim / 3)))
    if p * p * 3 != patch_dim:
        raise ConversionError(f"image_embedding/kernel has {patch_dim} input features, not patch*patch*3")
    hidden = int(need(fc1).shape[1])
    if hidden % d:
        raise ConversionError(f"{fc1} has {hidden} outputs, not a multiple of the width {d}")
    vals = dict(emb_dim=d, patch_size=p, depth=_count_blocks(flat, "encoder"),
                dec_emb_dim=int(need("decoder_input_projection/kernel").shape[1]),
                dec_depth=_count_blocks(flat, "decoder"), mlp_ratio=hidden // d,
                use_type_embedding="encoder_image_type_embedding" in flat)
    why = dict(emb_dim="cls_token", patch_size="image_embedding/kernel", depth="the encoder/Block_* count",
               dec_emb_dim="decoder_input_projection/kernel", dec_depth="the decoder/Block_* count",
               mlp_ratio=fc1, use_type_embedding="the presence of encoder_image_type_embedding")
    if "text_embedding/embedding" in flat:
        vals["vocab_size"], why["vocab_size"] = int(flat["text_embedding/embedding"].shape[0]), "text_embedding"
    depths = {h: _head_depth(flat, h) for h in ("decoder_image_output", "decoder_text_output")}
    found = {h: k for h, k in depths.items() if k is not None}
    if len(set(found.values())) > 1:
        raise ConversionError(f"the output heads differ in depth: {found} (official heads share output_head_depth)")
    if found:
        vals["output_head_depth"] = next(iter(found.values()))
        why["output_head_depth"] = "the Dense_* count of decoder_image_output"
    return vals, why


# (M3AEConfig field, CLI flag) the tensors do not show: the checkpoint's flags must state them
NOT_IN_SHAPES = (("num_heads", "--num-heads"), ("dec_num_heads", "--dec-num-heads"), ("image_size", "--image-size"),
                 ("text_length", "--text-length"))


def resolve_official_config(flat: Dict[str, np.ndarray], variant: Optional[dict] = None, **overrides
                            ) -> Tuple[M3AEConfig, List[str]]:
    """(M3AEConfig, notes) for an official tree: fields from the checkpoint's `variant` (resolved as the
    official get_default_config), checked against the tensor shapes; flags (`overrides`) win. Nothing is
    guessed: a field neither states nor the shapes show is an error naming its flag. Only the training-only
    fields (mask ratios, loss weights) fall back to the official defaults, with a note."""
    shape, why = official_shape_fields(flat)
    try:
        stated, origin, notes = fields_from_variant(variant) if variant else ({}, {}, [])
    except VariantError as e:
        raise ConversionError(f"checkpoint flags: {e}") from e
    given = {k: v for k, v in overrides.items() if v is not None}
    for f, v in stated.items():
        if f in shape and v != shape[f] and f not in given:
            raise ConversionError(f"the checkpoint's {origin[f]} gives {f}={v!r}, but {why[f]} says {shape[f]!r}")
        if f in given and given[f] != v:
            notes.append(f"{f}={given[f]!r} from the command line replaces the checkpoint's {origin[f]} ({v!r})")
    values = {**stated, **shape, "gelu": "tanh", "layer_norm_eps": 1e-6, "mask_sharing": "batch", **given}
    has_text = "vocab_size" in shape
    missing = [(f, flag) for f, flag in NOT_IN_SHAPES if f not in values and (has_text or f != "text_length")]
    if missing:
        raise ConversionError(f"the checkpoint does not state {', '.join(f for f, _ in missing)} "
                              f"({'no variant' if not variant else 'not in its variant'}); pass "
                              + " ".join(f"{flag} N" for _, flag in missing))
    defaulted = {f: v for f, v in TRAINING_FIELDS.items() if f not in values}
    if "image_mean" not in values:
        defaulted["image normalisation"] = "cc12m"
    if defaulted:
        notes.append("not stated by the checkpoint, official defaults used: "
                     + ", ".join(f"{k}={v}" for k, v in defaulted.items()))
        values.update({k: v for k, v in defaulted.items() if k in TRAINING_FIELDS})
    if not has_text:
        notes.append("image-only source: text_length / vocab_size are M3AEConfig defaults")
    known = {f.name for f in dataclasses.fields(M3AEConfig)}
    for f in [f for f in values if f not in known]:
        v = values.pop(f)
        if v not in (0, False):
            raise ConversionError(f"{origin.get(f, why.get(f, f))} sets {f}={v!r}, which this version of "
                                  f"m3ae_engine does not support")
    try:
        return M3AEConfig(**values), notes
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"the checkpoint's settings do not make a valid model: {e}") from e


def config_from_official(flat: Dict[str, np.ndarray], variant: Optional[dict] = None, **overrides) -> M3AEConfig:
    return resolve_official_config(flat, variant, **overrides)[0]


def _target_shapes(config: M3AEConfig) -> Dict[str, Tuple[int, ...]]:
    from ..model.m3ae import M3AE
    with torch.device("meta"):
        model = M3AE(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def official_to_state_dict(flat: Dict[str, np.ndarray], config: M3AEConfig, source: str = "official M3AE"
                           ) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Flat official params ('a/b/c' -> array) -> (partial torch state dict, report). Without any text
    entry in the source (the official MaskedAutoencoder) the text parameters are reported as not converted."""
    report = ConversionReport(source)
    has_text = any(k.startswith(TEXT_OFFICIAL) for k in flat)
    mapping = official_name_map(config, with_text=has_text)
    shapes = _target_shapes(config)
    sd: Dict[str, torch.Tensor] = {}
    used = set()
    for src, dst, kind in mapping:
        if src not in flat:
            if src.endswith("Attention_0/Dense_0/bias"):  # Attention(use_bias=False): zero bias is exact
                sd[dst] = torch.zeros(shapes[dst])
                report.notes.append(f"{src} absent (qkv without bias): zero bias")
                continue
            report.missing.append(src)
            continue
        used.add(src)
        arr = np.asarray(flat[src], dtype=np.float32)
        t = torch.from_numpy(arr.T.copy() if kind == "dense" else arr.copy())
        if tuple(t.shape) != shapes[dst]:
            report.shape_mismatch.append(f"{src} {tuple(arr.shape)} -> {dst} expects {shapes[dst]}"
                                         f"{' (transposed)' if kind == 'dense' else ''}")
            continue
        sd[dst] = t
        report.converted.append(dst)
    report.unexpected = sorted(set(flat) - used)
    if not has_text:
        report.not_converted = sorted(set(shapes) - set(sd))
        report.notes.append("image-only source: text parameters stay at initialisation")
    return sd, report


def state_dict_to_official(sd: Dict[str, torch.Tensor], config: M3AEConfig) -> dict:
    """Torch state dict -> nested official parameter tree of float32 numpy arrays (exact inverse)."""
    flat = {}
    for src, dst, kind in official_name_map(config):
        if dst not in sd:
            raise ConversionError(f"state dict lacks {dst!r} (needed for {src})")
        arr = _np(sd[dst]).astype(np.float32)
        flat[src] = np.ascontiguousarray(arr.T if kind == "dense" else arr)
    return unflatten_tree(flat)


def save_official_pickle(sd: Dict[str, torch.Tensor], config: M3AEConfig, path, step: int = 0) -> List[str]:
    """Write what the official `utils.load_checkpoint` reads: {'step', 'epoch', 'variant', 'state'} with
    `state.params['params']` the official tree and `variant` the official flags that describe `config`
    (so m3ae-to-torch reads the same config back). Returns notes on settings the official code lacks."""
    try:
        variant, notes = variant_from_config(config)
    except VariantError as e:
        raise ConversionError(str(e)) from e
    write_official_pickle(path, state_dict_to_official(sd, config), variant, step=step)
    return notes


# ---------------------------------------------------------------------------------------------
# facebookresearch/mae .pth -> M3AE (image-only)
# ---------------------------------------------------------------------------------------------
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
    shapes = _target_shapes(config)
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


# ---------------------------------------------------------------------------------------------
# export to timm
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# loading any checkpoint into an M3AE
# ---------------------------------------------------------------------------------------------
def _torch_load(path):
    import argparse as _ap
    from ..train.checkpoint import CheckpointError, load_weights_only
    try:  # an MAE .pth keeps its run's argparse.Namespace beside the weights
        return load_weights_only(path, allow=[_ap.Namespace])
    except CheckpointError as e:  # refused (it would run code), truncated or corrupt: one line
        raise ConversionError(str(e)) from None


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod.", "model."):
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def read_config_json(path) -> M3AEConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path} (the checkpoint needs its config.json)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    return M3AEConfig.from_dict(d.get("model", d) if isinstance(d.get("model"), dict) else d)


def _official_about(ckpt) -> List[str]:
    lines = [f"official M3AE checkpoint: step {ckpt.step}, epoch {ckpt.epoch}; parameters at {ckpt.params_at}"]
    if ckpt.variant is None:
        lines.append("no variant (run flags): the config comes from the tensor shapes and the command line")
    else:
        model = [f"{k}={v!r}" for k, v in ckpt.variant.items()
                 if k.startswith(("m3ae.", "mae.")) or k in OFFICIAL_FLAGS_SHOWN
                 or k.rsplit(".", 1)[-1] in ("image_size", "tokenizer_max_length", "image_normalization")]
        lines.append(f"variant ({len(ckpt.variant)} flags), the model's: " + ", ".join(model))
    return lines + ckpt.other


OFFICIAL_FLAGS_SHOWN = ("dataset", "patch_size", "discretized_image", "image_all_token_loss", "text_all_token_loss",
                        "image_loss_weight", "text_loss_weight", "unpaired_text_loss_weight")


def _read_official(path: Path, config: Optional[M3AEConfig], overrides: dict):
    try:
        ckpt = read_official_checkpoint(path)
    except OfficialCheckpointError as e:
        raise ConversionError(str(e)) from e
    flat = flatten_tree(ckpt.params)
    notes: List[str] = []
    if config is None:
        try:
            config, notes = resolve_official_config(flat, ckpt.variant, **overrides)
        except ConversionError as e:
            e.about = [f"source: {path}"] + [f"  {a}" for a in _official_about(ckpt)]  # inspect still shows it
            raise
    sd, report = official_to_state_dict(flat, config, f"{path}")
    report.about, report.step = _official_about(ckpt), ckpt.step
    report.notes = notes + report.notes
    return sd, config, report


def is_training_checkpoint(path: Path) -> bool:
    """A `RUN/checkpoints/step_N` directory of train.py (meta.json marks a complete one)."""
    return path.is_dir() and (path / "meta.json").is_file()


def _training_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path / 'meta.json'} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise ConversionError(f"{path / 'meta.json'} has no model_config: not a train.py checkpoint")
    return meta


def describe_training_checkpoint(path: Path) -> List[str]:
    """What a train.py checkpoint directory holds, from meta.json and the file list (no weights loaded)."""
    meta = _training_meta(path)
    tc = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    shown = ("preset", "modality", "batch_size", "grad_accum", "steps", "epochs", "base_lr", "weight_decay",
             "mask_sharing", "precision", "data")
    def size(n):
        return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

    files = sorted(p.name + ("/" if p.is_dir() else f" ({size(p.stat().st_size)})") for p in path.iterdir())
    return [f"train.py checkpoint: step {meta.get('step')}, runtime {meta.get('runtime')}, "
            f"world size {meta.get('world_size')}",
            "train config: " + ", ".join(f"{k}={tc[k]!r}" for k in shown if k in tc),
            "files: " + ", ".join(files)]


def _read_training_checkpoint(path: Path, config: Optional[M3AEConfig]):
    """Model weights + config of a train.py checkpoint directory (plain-PyTorch runtime; DeepSpeed shards
    are exported first). The optimizer state is described, not converted."""
    about = describe_training_checkpoint(path)
    meta = _training_meta(path)
    if not (path / "state.pt").is_file():
        kind = "DeepSpeed shards (deepspeed/)" if (path / "deepspeed").is_dir() else "no state.pt"
        raise ConversionError(f"{path}: {kind}; export the weights first: python -m m3ae_engine.checkpoint "
                              f"export {path} model.safetensors")
    if config is None:
        config = M3AEConfig.from_dict(meta["model_config"])
    from ..train.checkpoint import CheckpointError, load_weights_only
    try:  # tensors and plain containers only; mmap: the optimizer state is not read into memory
        state = load_weights_only(path / "state.pt", mmap=True)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    sd = state.get("model") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise ConversionError(f"{path / 'state.pt'} holds no 'model' state dict")
    opt = state.get("optimizer") or {}
    tensors = [t for s in (opt.get("state") or {}).values() for t in s.values() if isinstance(t, torch.Tensor)]
    about.append(f"optimizer state: {len(tensors)} tensors ({sum(t.numel() for t in tensors):,} values) "
                 f"-- not converted")
    return sd, config, about, meta.get("step")


def _check_state_dict(sd: Dict[str, torch.Tensor], config: M3AEConfig, source: str) -> ConversionReport:
    shapes = _target_shapes(config)
    report = ConversionReport(source)
    for k, v in sd.items():
        if k not in shapes:
            report.unexpected.append(k)
        elif tuple(v.shape) != shapes[k]:
            report.shape_mismatch.append(f"{k} {tuple(v.shape)} expects {shapes[k]}")
        else:
            report.converted.append(k)
    report.missing = sorted(set(shapes) - set(sd))
    return report


def read_checkpoint(path, config: Optional[M3AEConfig] = None, **overrides
                    ) -> Tuple[Dict[str, torch.Tensor], M3AEConfig, ConversionReport]:
    """Any supported checkpoint -> (M3AE state dict, config, report). `path`: a directory with
    model.safetensors (or model.pt) + config.json; a train.py checkpoint directory (step_N); a run directory
    holding only checkpoints/ (its newest); a .safetensors / .pt / .pth file (config.json beside it, or
    embedded); an official pickle (.pkl); an MAE .pth."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    about, step, notes = [], None, []
    if path.is_dir() and not is_training_checkpoint(path):
        for name in ("model.safetensors", "model.pt", "model.pth", "model.pkl"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            from ..train.checkpoint import list_checkpoints
            found = list_checkpoints(path / "checkpoints")
            if not found:
                raise FileNotFoundError(f"{path} holds no model.safetensors / model.pt / model.pkl, no meta.json "
                                        f"(train.py checkpoint) and no complete checkpoints/step_*")
            path = found[-1]
            notes.append(f"no exported model in the run directory: read its newest checkpoint {path.name}")
    cfg_json = path.parent / "config.json"
    suffix = path.suffix.lower()
    if is_training_checkpoint(path):
        sd, config, about, step = _read_training_checkpoint(path, config)
    elif suffix in (".pkl", ".pickle"):
        return _read_official(path, config, overrides)
    elif suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), "pt") as f:  # one open: tensors and the config metadata
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
            if config is None and "m3ae_config" in meta:
                config = M3AEConfig.from_dict(json.loads(meta["m3ae_config"]))
        except ConfigError:
            raise
        except (SafetensorError, OSError, ValueError) as e:  # a torn file or a mangled config in its metadata
            raise ConversionError(f"{path}: unreadable, truncated or corrupt safetensors file "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                                  ) from None
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        obj = _torch_load(path)
        if not isinstance(obj, dict):
            raise ConversionError(f"{path}: expected a dict, got {type(obj).__name__}")
        if config is None and isinstance(obj.get("config"), dict):
            config = M3AEConfig.from_dict(obj["config"])
        sd = obj.get("model", obj.get("state_dict", obj.get("module", obj)))
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConversionError(f"{path}: no state dict of tensors under 'model' / 'state_dict' / top level")
    else:
        raise ConversionError(f"unknown checkpoint type {path.name!r}: use a directory, .safetensors, .pt/.pth "
                              f"or an official .pkl")
    sd = _strip_prefixes(sd)
    if "patch_embed.proj.weight" in sd and "image_embedding.weight" not in sd:
        cfg = config or mae_config_from_state_dict(sd, **overrides)
        sd, report = mae_to_state_dict(sd, cfg)
        report.source = f"facebookresearch/mae {path}"
        return sd, cfg, report
    if config is None:
        config = read_config_json(cfg_json)
    if overrides:
        config = M3AEConfig.from_dict({**config.to_dict(), **overrides})
    report = _check_state_dict(sd, config, f"m3ae_engine checkpoint {path}")
    report.about, report.step, report.notes = about, step, notes + report.notes
    return {k: v.float() for k, v in sd.items()}, config, report


def load_model(path, config: Optional[M3AEConfig] = None, device="cpu", strict: bool = True,
               verbose: bool = False, **overrides):
    """Checkpoint -> (M3AE in eval mode on `device`, ConversionReport). Raises ConversionError listing
    missing / unexpected / mis-shaped keys (with strict=False only missing-by-design params are tolerated)."""
    from ..model.m3ae import M3AE
    sd, cfg, report = read_checkpoint(path, config, **overrides)
    if strict:
        report.raise_if_errors()
    model = M3AE(cfg)
    res = model.load_state_dict(sd, strict=False)
    left = sorted(set(res.missing_keys) - set(report.not_converted))
    if strict and left:
        raise ConversionError(f"{path}: parameters not filled: {left}")
    if verbose:
        print(report, file=sys.stderr)
    return model.to(device).eval(), report


def save_checkpoint(sd: Dict[str, torch.Tensor], config: M3AEConfig, out_dir) -> Path:
    """Write OUT_DIR/model.safetensors (config embedded in the metadata too) + OUT_DIR/config.json."""
    from ..train.checkpoint import save_exported  # the training export's writer: atomic, config in the metadata
    out = Path(out_dir)
    save_exported(sd, config.to_dict(), out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2))
    return out


def _full_state_dict(sd, cfg):
    """Fill params absent from a partial conversion with the model's initialisation."""
    from ..model.m3ae import M3AE
    model = M3AE(cfg)
    full = model.state_dict()
    full.update(sd)
    return full


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
OVERRIDE_FIELDS = ("image_size", "text_length", "num_heads", "dec_num_heads", "image_mask_ratio", "text_mask_ratio",
                   "mask_sharing", "image_loss_weight", "text_loss_weight", "unpaired_text_loss_weight")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ae_engine.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def arch(sp):
        g = sp.add_argument_group("model config (official pickles: replaces what the checkpoint's flags state)")
        g.add_argument("--image-size", type=int, default=None)
        g.add_argument("--text-length", type=int, default=None)
        g.add_argument("--num-heads", type=int, default=None)
        g.add_argument("--dec-num-heads", type=int, default=None)
        g.add_argument("--image-mask-ratio", type=float, default=None)
        g.add_argument("--text-mask-ratio", type=float, default=None)
        g.add_argument("--mask-sharing", choices=("batch", "sample"), default=None,
                       help="official M3AE: batch (one permutation per device); MAE: sample")
        g.add_argument("--image-loss-weight", type=float, default=None)
        g.add_argument("--text-loss-weight", type=float, default=None)
        g.add_argument("--unpaired-text-loss-weight", type=float, default=None)
        sp.add_argument("--config", default=None, help="config.json to use instead of the checkpoint's")
        sp.add_argument("--allow-unexpected", action="store_true", help="ignore source entries nothing maps to")

    for name, hlp in (("m3ae-to-torch", "official Flax pickle -> OUT_DIR (model.safetensors + config.json)"),
                      ("mae-to-torch", "facebookresearch/mae .pth -> OUT_DIR (image-only mode)"),
                      ("to-torch", "any supported checkpoint -> OUT_DIR")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("src")
        sp.add_argument("out_dir")
        arch(sp)
    sp = sub.add_parser("torch-to-m3ae", help="our checkpoint -> pickle the official load_checkpoint / "
                                              "--load_pretrained read (no optimizer state)")
    sp.add_argument("src")
    sp.add_argument("out")
    sp = sub.add_parser("to-timm", help="encoder -> timm vit_* state dict (.safetensors or .pth) + timm_config.json")
    sp.add_argument("src")
    sp.add_argument("out")
    sp = sub.add_parser("inspect", help="describe a checkpoint (official pickle, training checkpoint directory, "
                                        "export, MAE .pth) and what its tensors convert to")
    sp.add_argument("src")
    arch(sp)
    args = p.parse_args(argv)

    def overrides():
        return {k: getattr(args, k, None) for k in OVERRIDE_FIELDS}

    try:
        if args.cmd == "inspect" and is_training_checkpoint(Path(args.src)) and not (Path(args.src) / "state.pt").is_file():
            print("\n".join(describe_training_checkpoint(Path(args.src))))  # DeepSpeed shards: described only
            print(f"weights: not read here; export them with: python -m m3ae_engine.checkpoint export {args.src} "
                  f"model.safetensors")
            return 0
        if args.cmd in ("m3ae-to-torch", "mae-to-torch", "to-torch", "inspect"):
            src = Path(args.src)
            if args.cmd == "m3ae-to-torch" and src.suffix.lower() not in (".pkl", ".pickle"):
                raise ConversionError(f"m3ae-to-torch expects an official .pkl, got {src.name}")
            if args.cmd == "mae-to-torch" and src.suffix.lower() not in (".pth", ".pt", ".safetensors"):
                raise ConversionError(f"mae-to-torch expects an MAE .pth, got {src.name}")
            cfg = read_config_json(args.config) if args.config else None
            sd, cfg, report = read_checkpoint(src, cfg, **overrides())
            print(report)
            if args.cmd == "inspect":
                print("model config: " + json.dumps(cfg.to_dict(), indent=2))
                return 0 if report.ok else 1
            report.raise_if_errors(allow_unexpected=args.allow_unexpected)
            out = save_checkpoint(_full_state_dict(sd, cfg), cfg, args.out_dir)
            print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
        elif args.cmd == "torch-to-m3ae":
            sd, cfg, report = read_checkpoint(args.src)
            report.raise_if_errors()
            notes = save_official_pickle(_full_state_dict(sd, cfg), cfg, args.out, step=report.step or 0)
            for n in notes:
                print(f"note: {n}")
            print(f"wrote {args.out} (step {report.step or 0}; parameters and flags only, no optimizer state: "
                  f"official fine-tuning / linear probing can load it, official pre-training cannot resume it)")
        elif args.cmd == "to-timm":
            sd, cfg, report = read_checkpoint(args.src)
            report.raise_if_errors()
            tsd = to_timm_state_dict(_full_state_dict(sd, cfg), cfg)
            out = Path(args.out)
            if out.suffix == ".safetensors":
                from safetensors.torch import save_file
                atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in tsd.items()}, str(tmp)))
            else:
                atomic_write(out, lambda tmp: torch.save({"model": tsd}, str(tmp)))
            spec = timm_model_spec(cfg)
            atomic_write_text(out.parent / "timm_config.json", json.dumps(spec, indent=2))
            print(f"wrote {out} ({len(tsd)} tensors) and {out.parent / 'timm_config.json'}\n"
                  f"load: timm.create_model({spec['base_model_name']!r}, pretrained=False, num_classes=N, "
                  f"**{spec['kwargs']}).load_state_dict(sd, strict=False)  # head stays new")
    except (ConversionError, ConfigError, FileNotFoundError) as e:
        if args.cmd == "inspect" and getattr(e, "about", None):
            print("\n".join(e.about))
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
