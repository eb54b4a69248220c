"""Test setup: Triton kernels run through Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before `import triton` anywhere in the process.
"""
import os
import sys
from pathlib import Path

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_problem():
    """Triton < 3.7's CPU interpreter turns a runtime loop bound into a 1-element array and calls int() on
    it, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"):
    every Triton kernel with a data-dependent loop would fail in the tests for a reason outside the code."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    version = lambda s: tuple(int(x) for x in s.split("+")[0].split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s CPU interpreter does not work with numpy {numpy.__version__} "
                "(fixed in triton 3.7): pip install 'numpy<2.4' to run the Triton tests on the CPU")
    return None


def pytest_configure(config):
    problem = _interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _timm_problem():
    """Why timm cannot run here (None if it can). PyPI's torchvision, which timm imports, fails to load
    beside a torch build it was not made for (RuntimeError: operator torchvision::nms does not exist)."""
    try:
        import timm.data  # noqa: F401  (imports torchvision)
    except Exception as e:  # ImportError, or the RuntimeError of a mismatched torchvision
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"needs timm + a matching torchvision (CI's .venv-timm stage): {first}"
    return None


def pytest_collection_modifyitems(config, items):
    if any("timm" in item.keywords for item in items):
        problem = _timm_problem()
        if problem:
            skip_timm = pytest.mark.skip(reason=problem)
            for item in items:
                if "timm" in item.keywords:
                    item.add_marker(skip_timm)
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
