"""What every benchmark result records (device, driver, versions, commit, date) and the clocks the
benchmarks share (median milliseconds of a call, the measured matmul rate): one place for each.

The commit comes from $M3AE_GIT_COMMIT when set (the GPU machine receives a copy of the working
tree without .git), else from `git rev-parse HEAD`.
"""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip() or None
    except Exception:
        return None


def environment(device: torch.device, modules: Sequence[str] = ()) -> dict:
    """`modules`: optional packages whose versions the result also records (None when absent)."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "platform": platform.platform(), "hostname": platform.node()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    for mod in modules:
        try:
            env[mod] = getattr(importlib.import_module(mod), "__version__", "installed")
        except Exception:
            env[mod] = None
    env["git_commit"] = git_commit()
    env["git_dirty"] = env["git_commit"].endswith("-dirty")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = torch.cuda.get_device_name(device)
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        env["cudnn"] = torch.backends.cudnn.version()
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if env["driver"]:
            env["driver"] = env["driver"].splitlines()[0]
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        env["driver"] = None
    return env


def git_commit() -> str:
    """The commit a result was measured at: $M3AE_GIT_COMMIT, else git HEAD (+ "-dirty"), else unknown."""
    commit = os.environ.get("M3AE_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    if not commit:
        return "unknown (not a git checkout; set M3AE_GIT_COMMIT)"
    dirty = not os.environ.get("M3AE_GIT_COMMIT") and bool(_run(["git", "status", "--porcelain",
                                                                 "--untracked-files=no"]))
    return commit + ("-dirty" if dirty else "")


def median_ms(fn: Callable, device, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of one fn() call: triton's do_bench on a GPU (L2 flushed between calls; CUDA
    events without triton), the wall clock of 3 calls on the CPU."""
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except ImportError:
            pass
        for _ in range(5):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(30)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(30)]
        for a, b in zip(starts, ends):
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_tflops(device, dtype=None) -> dict:
    """The matmul rate MFU is measured against: n^3 torch.matmul of random data (GPU: 8192, bf16 unless
    `dtype`; CPU: 1024, fp32), median time. {"size", "dtype", "ms", "tflops"}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    ab = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    ms = median_ms(lambda: torch.matmul(*ab), device, 100, 500)
    ab.clear()
    if cuda:
        torch.cuda.empty_cache()
    return {"size": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12}


def error_text(e: BaseException, limit: int = 300) -> str:
    """A failure as a result records it: the type and the first line of the message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:limit] if str(e) else ''}"
