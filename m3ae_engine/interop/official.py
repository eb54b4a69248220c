"""Official M3AE (JAX/Flax, young-geng/m3ae_public) parameters <-> M3AE state dicts.

Numerics (facts of the sources): Flax Dense kernels are [in, out]; a torch Linear weight is kernel.T. The
official qkv Dense lays its output features out as (3, heads, head_dim), exactly as our `Attention.qkv`,
so no permutation. LayerNorm eps 1e-6 and tanh GELU. The model config comes from the checkpoint's own flags
(`variant`, resolved as the official `get_default_config`: official_flags.py) and is checked against the
tensor shapes; what neither states is an error that names the flag to pass.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..model.config import ConfigError, M3AEConfig
from ..model.heads import official_head_keys
from .official_flags import TRAINING_FIELDS, VariantError, fields_from_variant, variant_from_config
from .official_pickle import OfficialCheckpointError, read_official_checkpoint, write_official_pickle
from .report import ConversionError, ConversionReport, as_numpy, flatten_tree, target_shapes, unflatten_tree

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


def official_to_state_dict(flat: Dict[str, np.ndarray], config: M3AEConfig, source: str = "official M3AE"
                           ) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Flat official params ('a/b/c' -> array) -> (partial torch state dict, report). Without any text
    entry in the source (the official MaskedAutoencoder) the text parameters are reported as not converted."""
    report = ConversionReport(source)
    has_text = any(k.startswith(TEXT_OFFICIAL) for k in flat)
    mapping = official_name_map(config, with_text=has_text)
    shapes = target_shapes(config)
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
        arr = as_numpy(sd[dst]).astype(np.float32)
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


OFFICIAL_FLAGS_SHOWN = ("dataset", "patch_size", "discretized_image", "image_all_token_loss", "text_all_token_loss",
                        "image_loss_weight", "text_loss_weight", "unpaired_text_loss_weight")


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


def read_official(path: Path, config: Optional[M3AEConfig], overrides: dict):
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
