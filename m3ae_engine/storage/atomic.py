"""Atomic file writes: a reader (or a crash) never sees a half-written file where a good one was."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`; it is fsync'ed and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_stream(path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` fills an open binary file (e.g. `fig.savefig(f)`, `torch.save(obj, f)`), atomically."""
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)
    return atomic_write(path, fill)
