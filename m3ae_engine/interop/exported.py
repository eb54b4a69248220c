"""m3ae_engine's own export: DIR/model.safetensors (fp32, the config in its metadata too) + DIR/config.json,
the layout train.py's final export, `save_pretrained` and every `convert` command write."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..model.config import ConfigError, M3AEConfig
from ..storage.atomic import atomic_write, atomic_write_text
from ..storage.safe_load import CheckpointError, first_line, load_weights_only
from .report import ConversionError


def save_exported(state_dict: dict, model_config: dict, out: Path) -> None:
    """Write fp32 CPU weights to a safetensors file (atomic: temp + fsync + rename) with the model config in
    its metadata."""
    from safetensors.torch import save_file
    state_dict = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {"m3ae_config": json.dumps(model_config), "format": "pt"}
    atomic_write(out, lambda tmp: save_file(state_dict, str(tmp), metadata=metadata))


def save_checkpoint(sd: Dict[str, torch.Tensor], config: M3AEConfig, out_dir) -> Path:
    """Write OUT_DIR/model.safetensors (config embedded in the metadata too) + OUT_DIR/config.json."""
    out = Path(out_dir)
    save_exported(sd, config.to_dict(), out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2))
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


def read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[M3AEConfig]]:
    """(tensors, the config in its metadata or None) of a .safetensors file; a torn file or a mangled
    config is a one-line ConversionError."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:  # one open: tensors and the config metadata
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        return sd, (M3AEConfig.from_dict(json.loads(meta["m3ae_config"])) if "m3ae_config" in meta else None)
    except ConfigError:
        raise
    except (SafetensorError, OSError, ValueError) as e:  # a torn file or a mangled config in its metadata
        raise ConversionError(f"{path}: unreadable, truncated or corrupt safetensors file ({first_line(e)})") from None


def read_torch_file(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[M3AEConfig]]:
    """(state dict, the config stored beside it or None) of a torch file (.pt/.pth/.bin/.ckpt): ours, an MAE
    .pth (its run's argparse.Namespace is allowed beside the weights) or any {'model'|'state_dict'|'module'|
    top level: tensors} dict. Weights-only: nothing in the file runs."""
    try:
        obj = load_weights_only(path, allow=[argparse.Namespace])
    except CheckpointError as e:  # refused (it would run code), truncated or corrupt: one line
        raise ConversionError(str(e)) from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict, got {type(obj).__name__}")
    config = M3AEConfig.from_dict(obj["config"]) if isinstance(obj.get("config"), dict) else None
    sd = obj.get("model", obj.get("state_dict", obj.get("module", obj)))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path}: no state dict of tensors under 'model' / 'state_dict' / top level")
    return sd, config
