"""Shared helpers of the Triton kernel tests (poisoned allocations, tolerances, small plans)."""
from __future__ import annotations

import contextlib

import pytest
import torch

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / empty_like return NaN-filled (float) or -7-filled (int) memory inside the block,
    so any element a kernel forgets to write shows up in the comparison."""
    orig_empty, orig_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    torch.empty = lambda *a, **k: fill(orig_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(orig_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_like


NORM_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def close_norm(actual, expected, dtype=torch.float32, what=""):
    """||a - e|| / ||e|| within the dtype's rounding: for results summed over many rows (thousands),
    where elementwise tolerances flag pure summation-order rounding on near-zero entries."""
    a, e = actual.double(), expected.double()
    rel = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    assert rel < NORM_TOL[dtype], f"{what}: relative error {rel:.3g} >= {NORM_TOL[dtype]}"


def close(actual, expected, dtype=torch.float32, scale=1.0, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what}: {m}")


def text_padding(b: int, lt: int, gen: torch.Generator) -> torch.Tensor:
    """[B, Lt] 1 = padding, random lengths including an empty and a full caption when B >= 3."""
    lengths = torch.randint(0, lt + 1, (b,), generator=gen)
    if b >= 3:
        lengths[0], lengths[1] = 0, lt
    return (torch.arange(lt)[None, :] >= lengths[:, None]).float()


@contextlib.contextmanager
def gpu_launch_config():
    """Run the kernels with the launch shapes they use on a GPU (few rows a program, wide V blocks,
    multi-program reductions) while still in the interpreter, so those code paths are tested on CPU."""
    import importlib
    mods = [importlib.import_module(f"m3ae_engine.kernels.{m}")
            for m in ("_common", "masked_mse", "masked_linear_cross_entropy")]
    saved = [m.interpreting for m in mods]
    for m in mods:
        m.interpreting = lambda: False
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            m.interpreting = f
