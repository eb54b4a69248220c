"""Training: the loop (`loop.train`), `TrainConfig` and its command line, runtimes (plain / DDP / DeepSpeed),
optimiser and schedule, checkpoints, the output-folder lock, logging."""
