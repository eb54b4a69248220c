"""What every benchmark result records: device, driver, versions, commit and date (one place).

The commit comes from $M3AE_GIT_COMMIT when set (the GPU machine receives a copy of the working
tree without .git), else from `git rev-parse HEAD`.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip() or None
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "platform": platform.platform(), "hostname": platform.node()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
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
