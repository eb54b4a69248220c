"""One training run per output folder: `OUTPUT_DIR/.lock`, created with O_EXCL, holds the owner's PID and host.

Two runs writing one folder destroy each other (checkpoints, metrics.jsonl, train_config.json), so a run
takes the lock before it changes anything there and a second run stops with
`error: OUTPUT_DIR is in use by PID N on HOST` having changed nothing. A lock left by a crashed run is
not stuck: when its PID is not alive on this host, the next run takes it over and says so. A lock from
another host cannot be checked from here: the message says to delete the file if that run is gone.

Only global rank 0 takes the lock (the other ranks, also on other nodes, write into the folder only in
collective checkpoint saves that rank 0 drives); train/loop.py shares the outcome with every rank.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ..model.config import ConfigError

LOCK_NAME = ".lock"


class OutputDirInUse(ConfigError):
    """Another live run holds the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class OutputDirLock:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.note: Optional[str] = None  # set when a stale lock was taken over
        self.held = False

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._read()
                pid, host = owner.get("pid"), owner.get("host")
                if not owner:  # torn or being written right now: give its writer a moment
                    time.sleep(0.2)
                    owner = self._read()
                    pid, host = owner.get("pid"), owner.get("host")
                if owner and host != me["host"]:
                    raise OutputDirInUse(f"{self.path.parent} is in use by PID {pid} on host {host} (lock file "
                                         f"{self.path}; if that run is gone, delete the file)")
                if isinstance(pid, int) and _pid_alive(pid) and pid != me["pid"]:
                    raise OutputDirInUse(f"{self.path.parent} is in use by PID {pid} (lock file {self.path})")
                # stale: its owner died without releasing it (or the file is unreadable) -> take over
                self.note = (f"note: took over the stale lock {self.path} of PID {pid} on {host}, which is "
                             f"no longer running")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise OutputDirInUse(f"{self.path.parent}: could not take the lock {self.path} (another run races for it)")

    def release(self) -> None:
        if self.held:
            if self._read().get("pid") == os.getpid():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            self.held = False
