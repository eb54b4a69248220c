"""What ends a run early, and the test hooks that simulate it: SIGTERM / SIGINT (a checkpoint first), runs of
non-finite steps (--max-bad-steps), a crash in the middle of a checkpoint write."""
from __future__ import annotations

import os
import signal

import torch

from ..interop.run_checkpoint import step_dir_name


def inject_nan_steps():
    env = os.environ.get("M3AE_INJECT_NAN_STEPS", "")
    return {int(s) for s in env.split(",") if s.strip()}



def checkpoint_crash_hook():
    """Test hooks, run in the middle of a checkpoint write: M3AE_CRASH_IN_CHECKPOINT_STEP=N kills the
    process while it writes step N; M3AE_SIGNAL_IN_CHECKPOINT=SIGNUM sends it that signal (a second
    Ctrl-C / SIGTERM arriving during the save)."""
    at = os.environ.get("M3AE_CRASH_IN_CHECKPOINT_STEP")
    sig = os.environ.get("M3AE_SIGNAL_IN_CHECKPOINT")
    if not at and not sig:
        return None

    def hook(tmp_dir):
        if at and tmp_dir.name.endswith(step_dir_name(int(at))):
            os._exit(17)
        if sig:
            os.kill(os.getpid(), int(sig))
    return hook



class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits.
    The handlers stay installed until that final checkpoint is written: a second signal (an impatient
    Ctrl-C, a scheduler's repeated SIGTERM) is noted and cannot interrupt the save."""

    def __init__(self):
        self.signum = None
        self.repeats = 0
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.repeats += 1  # os.write: print() is not safe inside a signal handler
            os.write(2, f"note: signal {signum} received again; finishing the checkpoint first, then "
                        f"exiting\n".encode())
            return
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)



class BadRunWatch:
    """The longest run of consecutive skipped steps, seen by the host at EVERY step (--max-bad-steps acts
    on time) without stalling the GPU: on CUDA the device counter is copied to pinned memory after each
    step and read one step later, once the GPU has finished that step; elsewhere it is read at once."""

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.long, pin_memory=self.lagged)
        self.event = None

    def update(self, run_max: torch.Tensor) -> int:
        if not self.lagged:
            return int(run_max)
        seen = 0
        if self.event is not None:
            self.event.synchronize()  # the previous step: done by now while this one is queued
            seen = int(self.host)
        self.host.copy_(run_max, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return seen



class SkipCounters:
    """Skipped (non-finite) steps, kept on the device so the hot loop never waits for it: the total, the
    current run of consecutive skips and the longest run so far."""

    def __init__(self, device: torch.device, total: int = 0):
        self.total = torch.full((), total, dtype=torch.long, device=device)
        self.run = torch.zeros((), dtype=torch.long, device=device)
        self.run_max = torch.zeros((), dtype=torch.long, device=device)

    def add(self, bad: torch.Tensor) -> None:
        bad = bad.long()
        self.total += bad
        self.run.mul_(bad).add_(bad)  # consecutive skips; reset by a good step
        torch.maximum(self.run_max, self.run, out=self.run_max)
