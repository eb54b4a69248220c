"""Reading files others made without running code from them: torch.load restricted to tensors and plain data.

Checkpoints, exports and MAE `.pth` files are shared between people and clusters, so a file is untrusted:
a pickle that would build any other object is refused with a one-line CheckpointError, as is a truncated
or corrupt file.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from typing import Sequence

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read: the one-line message names the file and what to do."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def refusal(e: BaseException) -> str:
    """What the weights-only unpickler refused (torch's own message goes on to suggest weights_only=False,
    which is exactly what must not be done with a file from elsewhere)."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"it would call {m.group(1)}" if m else "an object the weights-only unpickler does not allow"


def load_weights_only(path, map_location="cpu", mmap: bool = False, allow: Sequence[type] = ()):
    """torch.load restricted to tensors, numbers, strings and containers (weights_only=True): a pickle
    that would build any other object, and so could run code, is refused with a CheckpointError, as is
    a truncated or corrupt file. mmap: tensors stay on disk until touched (e.g. an unused optimizer state);
    only torch's zip format can be mapped, so another file is read whole (and judged as without mmap).
    allow: further plain classes the file may hold (e.g. the argparse.Namespace of an MAE .pth)."""
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain data, "
                              f"which could run code ({refusal(e)})") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing (incomplete checkpoint)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({first_line(e)})") from None
