"""`python train.py` / `m3ae-train`: parse the options, train, and turn a user's mistake into one line.

On several ranks every rank finds the same configuration error: rank 0 prints it and all exit with
status 2, without a traceback. Errors that can differ between ranks (a bad shard on one) are printed by
the rank that has them, prefixed with its rank."""
from __future__ import annotations

import os
import sys
import time

from ..model.attention import AttentionBackendUnavailable
from .checkpoint import CheckpointError
from ..model.config import ConfigError
from ..data.sources import DataError
from ..ops import BackendUnavailable
from .config import parse

USER_ERRORS = (ConfigError, FileNotFoundError, DataError, BackendUnavailable, AttentionBackendUnavailable,
               CheckpointError)
EXIT_DIVERGED = 3  # --max-bad-steps non-finite steps in a row (a checkpoint of the last good weights is saved)


def _rank_world():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def main(argv=None):
    """Train; returns (first logged loss, last logged loss). Exits with status 2 and one line on bad input."""
    rank, world = _rank_world()
    try:
        cfg = parse(argv)
        from .loop import TrainingDiverged, train
        try:
            result = train(cfg)
        except TrainingDiverged as e:  # a documented stop, not a crash: one line, its own status
            print(f"error: {e}" if world == 1 else f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_DIVERGED) from None
    except ConfigError as e:  # the same on every rank: said once
        if world == 1:
            raise SystemExit(f"error: {e}") from None
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:  # a launcher kills the other ranks when one exits: let rank 0 print first
            time.sleep(2.0)
        raise SystemExit(2) from None
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}" if world == 1 else f"error (rank {rank}): {e}") from None
    return result["first"], result["last"]


def cli() -> int:
    """The `m3ae-train` console script."""
    main()
    return 0
