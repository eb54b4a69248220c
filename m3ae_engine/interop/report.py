"""What a conversion did, and the pieces every format's converter shares: the report, its error,
parameter trees flattened to 'a/b/c' names, and the target shapes of an M3AE config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..model.config import M3AEConfig
from ..model.m3ae import M3AE


class ConversionError(ValueError):
    """A checkpoint cannot be converted: missing, unexpected or mis-shaped entries, or an unknown format."""


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


def as_numpy(x) -> np.ndarray:
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


def target_shapes(config: M3AEConfig) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        model = M3AE(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(sd: Dict[str, torch.Tensor], config: M3AEConfig, source: str) -> ConversionReport:
    shapes = target_shapes(config)
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


def full_state_dict(sd, cfg):
    """Fill params absent from a partial conversion with the model's initialisation."""
    model = M3AE(cfg)
    full = model.state_dict()
    full.update(sd)
    return full


def strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod.", "model."):
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out
