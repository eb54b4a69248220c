#!/usr/bin/env python
"""Pretrain M3AE / MAE (also installed as the `m3ae-train` command).

  python train.py                                   tiny preset, synthetic data, CPU or GPU (a demo)
  torchrun --nproc_per_node 8 train.py --config configs/m3ae_base.yaml  plain PyTorch DDP
  deepspeed train.py --deepspeed_config ds.json --config configs/m3ae_base.yaml   DeepSpeed ZeRO
  deepspeed --hostfile hostfile train.py --deepspeed_config ds.json ...     many nodes

Options: `python train.py --help`; every option also goes in a YAML/JSON file given with --config.

Exit codes: 0 done (or stopped by SIGTERM/SIGINT after saving a checkpoint); 1 a one-line `error: ...`
(bad config or data, output folder in use, unwritable or unloadable checkpoint); 2 a configuration
error on several ranks (printed once, by rank 0) or a command-line syntax error;
3 (EXIT_DIVERGED) --max-bad-steps non-finite steps in a row: checkpoint of the last good weights saved.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a clone without an install

from m3ae_engine.train.cli import EXIT_DIVERGED, main  # noqa: E402,F401  (tests call train.main)

if __name__ == "__main__":
    main()
