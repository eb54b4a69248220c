"""Any supported checkpoint -> an M3AE: the format is found from the path, each format's reader converts."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..model.config import M3AEConfig
from ..model.m3ae import M3AE
from .exported import read_config_json, read_safetensors, read_torch_file
from .mae import mae_config_from_state_dict, mae_to_state_dict
from .official import read_official
from .report import ConversionError, ConversionReport, check_state_dict, strip_prefixes
from .run_checkpoint import is_training_checkpoint, list_checkpoints, read_training_checkpoint


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
            found = list_checkpoints(path / "checkpoints")
            if not found:
                raise FileNotFoundError(f"{path} holds no model.safetensors / model.pt / model.pkl, no meta.json "
                                        f"(train.py checkpoint) and no complete checkpoints/step_*")
            path = found[-1]
            notes.append(f"no exported model in the run directory: read its newest checkpoint {path.name}")
    cfg_json = path.parent / "config.json"
    suffix = path.suffix.lower()
    if is_training_checkpoint(path):
        sd, config, about, step = read_training_checkpoint(path, config)
    elif suffix in (".pkl", ".pickle"):
        return read_official(path, config, overrides)
    elif suffix == ".safetensors":
        sd, stated = read_safetensors(path)
        config = config or stated
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        sd, stated = read_torch_file(path)
        config = config or stated
    else:
        raise ConversionError(f"unknown checkpoint type {path.name!r}: use a directory, .safetensors, .pt/.pth "
                              f"or an official .pkl")
    sd = strip_prefixes(sd)
    if "patch_embed.proj.weight" in sd and "image_embedding.weight" not in sd:
        cfg = config or mae_config_from_state_dict(sd, **overrides)
        sd, report = mae_to_state_dict(sd, cfg)
        report.source = f"facebookresearch/mae {path}"
        return sd, cfg, report
    if config is None:
        config = read_config_json(cfg_json)
    if overrides:
        config = M3AEConfig.from_dict({**config.to_dict(), **overrides})
    report = check_state_dict(sd, config, f"m3ae_engine checkpoint {path}")
    report.about, report.step, report.notes = about, step, notes + report.notes
    return {k: v.float() for k, v in sd.items()}, config, report


def load_model(path, config: Optional[M3AEConfig] = None, device="cpu", strict: bool = True,
               verbose: bool = False, **overrides):
    """Checkpoint -> (M3AE in eval mode on `device`, ConversionReport). Raises ConversionError listing
    missing / unexpected / mis-shaped keys (with strict=False only missing-by-design params are tolerated)."""
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
