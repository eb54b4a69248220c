"""Hugging Face-style loading and saving for M3AE: `M3AE.from_pretrained(DIR_or_FILE)` and
`model.save_pretrained(DIR)`.

The format is the one `train.py` and `python -m m3ae_engine.convert` write: DIR/model.safetensors (fp32,
the config also in its metadata) + DIR/config.json. `from_pretrained` reads everything
`m3ae_engine.interop.load.load_model` reads (a run or converted directory, a .safetensors / .pt file, an
official M3AE .pkl, an MAE .pth), with the same strictness, and never unpickles code.

The two are methods of `M3AE`, given to it by the package's `__init__` (`M3AE.from_pretrained =
classmethod(from_pretrained)`): the model layer may not import this one, which reads and writes files
through the converters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .exported import save_checkpoint
from .load import load_model


def from_pretrained(cls, path: Union[str, Path], device="cpu", strict: bool = True, **overrides):
    """An M3AE in eval mode with the weights at `path` (missing / unexpected / mis-shaped tensors are
    errors with strict=True). `overrides` (e.g. image_size=...) change config fields that do not
    change the weights' shapes."""
    model, _ = load_model(path, device=device, strict=strict, **overrides)
    return model


def save_pretrained(self, out_dir: Union[str, Path]) -> Path:
    """Write OUT_DIR/model.safetensors + OUT_DIR/config.json (atomic safetensors write); returns OUT_DIR."""
    return save_checkpoint(self.state_dict(), self.config, out_dir)
