"""train.py's run folders as a source: the checkpoint layout and reading a checkpoint's weights.

    RUN/checkpoints/step_00000100/    a complete checkpoint (meta.json is written last and marks it)
    RUN/checkpoints/.tmp-step_N/      a write in progress, never read

train/checkpoint.py writes this layout; it lives here, below train, because conversion and
`from_pretrained` read run folders too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional

import torch

from ..model.config import M3AEConfig
from ..storage.safe_load import CheckpointError, load_weights_only
from .report import ConversionError

STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: Path):
    """Complete checkpoints (they have meta.json), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def is_training_checkpoint(path: Path) -> bool:
    """A `RUN/checkpoints/step_N` directory of train.py (meta.json marks a complete one)."""
    return path.is_dir() and (path / "meta.json").is_file()


def training_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path / 'meta.json'} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise ConversionError(f"{path / 'meta.json'} has no model_config: not a train.py checkpoint")
    return meta


def describe_training_checkpoint(path: Path) -> List[str]:
    """What a train.py checkpoint directory holds, from meta.json and the file list (no weights loaded)."""
    meta = training_meta(path)
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


def read_training_checkpoint(path: Path, config: Optional[M3AEConfig]):
    """Model weights + config of a train.py checkpoint directory (plain-PyTorch runtime; DeepSpeed shards
    are exported first). The optimizer state is described, not converted."""
    about = describe_training_checkpoint(path)
    meta = training_meta(path)
    if not (path / "state.pt").is_file():
        kind = "DeepSpeed shards (deepspeed/)" if (path / "deepspeed").is_dir() else "no state.pt"
        raise ConversionError(f"{path}: {kind}; export the weights first: python -m m3ae_engine.checkpoint "
                              f"export {path} model.safetensors")
    if config is None:
        config = M3AEConfig.from_dict(meta["model_config"])
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
