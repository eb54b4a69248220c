#!/usr/bin/env python
"""Pretrain M3AE / MAE.

  python train.py                                   tiny preset, synthetic data, CPU or GPU (a demo)
  torchrun --nproc_per_node 8 train.py --config configs/m3ae_base.yaml  plain PyTorch DDP
  deepspeed train.py --deepspeed_config ds.json --config configs/m3ae_base.yaml   DeepSpeed ZeRO
  deepspeed --hostfile hostfile train.py --deepspeed_config ds.json ...     many nodes

Options: `python train.py --help`; every option also goes in a YAML/JSON file given with --config.

Exit codes: 0 done (or stopped by SIGTERM/SIGINT after saving a checkpoint); 1 a one-line `error: ...`
(bad config or data, output folder in use, unwritable or unloadable checkpoint);
3 (EXIT_DIVERGED) --max-bad-steps non-finite steps in a row: checkpoint of the last good weights saved.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a clone without an install

from m3ae_engine.attention import AttentionBackendUnavailable  # noqa: E402
from m3ae_engine.config import ConfigError  # noqa: E402
from m3ae_engine.data.sources import DataError  # noqa: E402
from m3ae_engine.ops import BackendUnavailable  # noqa: E402
from m3ae_engine.checkpoint import CheckpointError  # noqa: E402
from m3ae_engine.train_config import parse  # noqa: E402

EXIT_DIVERGED = 3


def main(argv=None):
    try:
        cfg = parse(argv)
        from m3ae_engine.trainer import TrainingDiverged, train
        try:
            result = train(cfg)
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_DIVERGED) from None
    except (ConfigError, FileNotFoundError, DataError, BackendUnavailable, AttentionBackendUnavailable,
            CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    return result["first"], result["last"]


if __name__ == "__main__":
    main()
