"""The training loop: data -> masked forward/backward -> skip-or-step -> log / eval / checkpoint.

One loop for every launch mode (python, torchrun, deepspeed); runtime.py hides plain/DDP/DeepSpeed.
The hot loop never waits for the device except at the log interval: losses, skip flags and counters
stay on the device until then. `train` reads as its steps: set up (model, runtime, data streams), take the
output folder, resume, announce, then per step `train_step`, `log_step` at the log interval, checkpoints
and evals, and at the end `finish` (final export, summary). batches.py says what each rank reads and why
the masks do not depend on the world size; stops.py what ends a run early.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import ops
from ..model import attention as attention_backends
from ..model.config import ConfigError, M3AEConfig
from ..model.m3ae import M3AE
from .batches import EVAL_SEED_OFFSET, MaskNoise, Streams, build_data, build_streams, check_data, micro_batch
from .checkpoint import (all_ranks_ok, clean_stale_temp, consolidated_state_dict, load_first_good, resolve_resume,
                         save_checkpoint, save_exported, step_dir_name, truncate_metrics)
from .config import TrainConfig
from .logger import Logger, flops_per_sample_fn, memory_gb, peak_flops
from .optim import warmup_cosine
from .output_lock import OutputDirInUse, OutputDirLock
from .runtime import DistInfo, build_runtime, dist_from_env, forward_micro_batch, micro_per_rank, pick_device
from .stops import BadRunWatch, SkipCounters, StopRequested, checkpoint_crash_hook, inject_nan_steps


def cpu_threads() -> int:
    """Threads of a single-process CPU run: all logical CPUs, or $M3AE_CPU_THREADS (e.g. 1 on a shared,
    loaded machine, where OpenMP's barriers stall whenever one of its threads is descheduled)."""
    value = os.environ.get("M3AE_CPU_THREADS", "")
    if not value:
        return max(1, os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"M3AE_CPU_THREADS must be a positive integer, got {value!r}")
    return int(value)



def agree_output_dir(cfg: TrainConfig, info: DistInfo) -> None:
    """Every rank writes where rank 0 does: the default output folder is named by the time each rank
    parsed its arguments, which may differ by a second."""
    if info.distributed and dist.is_available() and dist.is_initialized():
        box = [cfg.output_dir]
        dist.broadcast_object_list(box, src=0)
        cfg.output_dir = box[0]



def log_interval(cfg: TrainConfig, total_steps: int) -> int:
    """--log-every, but about 10 updates at least for a run shorter than 10 intervals (a 20-step run
    would otherwise show the first step's numbers until it ends)."""
    return max(1, min(cfg.log_every, total_steps // 10))



def _take_output_dir(out_dir: Optional[Path], info: DistInfo, held: list) -> None:
    """Rank 0 locks OUTPUT_DIR (output_lock.py); every rank learns the outcome, so a second run stops on all
    ranks before it changes anything in the folder."""
    if out_dir is None:
        return
    error, kind = None, OutputDirInUse
    if info.is_main:
        try:
            lock = OutputDirLock(out_dir).acquire()
            held.append(lock)
            if lock.note:
                print(lock.note, flush=True)
        except OutputDirInUse as e:
            error = str(e)
        except OSError as e:  # not creatable / writable: one line, and the other ranks must hear of it too
            error, kind = f"cannot write into the output folder {out_dir}: {e.strerror or e}", ConfigError
    if not all_ranks_ok(error is None) and error is None:
        error = f"{out_dir} cannot be used by this run (see rank 0's message)"
    if error is not None:
        raise kind(error)



def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t



def _loss_vector(out) -> torch.Tensor:
    zero = out.loss.new_zeros(()) if torch.is_tensor(out.loss) else torch.zeros(())
    parts = [out.loss, out.image_loss, out.text_loss]
    return torch.stack([(p if p is not None else zero).detach().float() for p in parts])



@torch.no_grad()
def evaluate(runtime, cfg, model_config, info, micro, device) -> dict:
    """Loss on fixed held-out synthetic batches with fixed masks: comparable across steps and runs."""
    # every caption kept: the eval loss stays comparable across --paired-fraction runs
    data = build_data(cfg, model_config, info, micro, seed=cfg.seed + EVAL_SEED_OFFSET, drop_text=False)
    noise = MaskNoise(cfg.seed + EVAL_SEED_OFFSET, model_config.num_patches, model_config.text_length,
                      micro * info.world_size, "sample")
    model = getattr(runtime, "engine", None) or runtime.model
    total = torch.zeros(3, device=device)
    for i in range(cfg.eval_batches):
        with runtime.autocast:
            b = data.batch_at(i)
            # the training forward (image-only in MAE mode; any runtime's output), without the unpaired term
            out = forward_micro_batch(model, micro_batch(b, cfg.modality, None, None),
                                      noise(i, 0, info.rank, info.world_size, micro), device)
        total += _loss_vector(out).to(device)
    total = _all_reduce(total) / (cfg.eval_batches * info.world_size)
    loss, img, txt = total.tolist()
    return {"eval_loss": loss, "eval_image_loss": img, "eval_text_loss": txt}



def train(cfg: TrainConfig) -> dict:
    """Train; the output-dir lock is released however the run ends."""
    held: list = []
    try:
        return _train(cfg, held)
    finally:
        for lock in held:
            lock.release()


@dataclass
class Run:
    """What one run is made of, once set up (the same on every rank but for its own data rows)."""
    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    model_config: M3AEConfig
    runtime: object
    n_params: int
    streams: Streams
    out_dir: Optional[Path]

    @property
    def ckpt_root(self) -> Optional[Path]:
        return self.out_dir / "checkpoints" if self.out_dir else None

    @property
    def meta(self) -> dict:
        return {"train_config": self.cfg.to_dict(), "model_config": self.model_config.to_dict(),
                "runtime": self.runtime.kind, "world_size": self.info.world_size}


def check_backends(cfg: TrainConfig, device: torch.device) -> None:
    """A named kernel or attention backend that cannot run here fails now, not at the first forward."""
    if cfg.kernels != "auto":
        ops.resolve_backend(cfg.kernels, device)
    if cfg.attention != "auto":
        attention_backends.resolve_backend(cfg.attention, device)


def build_model(cfg: TrainConfig) -> M3AE:
    """The model, seeded alike on every rank: DDP / ZeRO start from identical replicas."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = M3AE(M3AEConfig.from_preset(cfg.preset, **cfg.model_overrides()))
    if cfg.modality == "image" and cfg.unpaired_text_data is None:
        # MAE mode never runs the text path: freeze its parameters so DDP does not wait for their
        # gradients and AdamW does not decay them
        for p in model.text_parameters():
            p.requires_grad_(False)
    return model


def set_up(cfg: TrainConfig) -> Run:
    info = dist_from_env()
    build_loader = check_data(cfg)  # before any work: a missing path fails in a second, not after init
    micro = micro_per_rank(cfg, info)  # samples per rank per micro-step
    device = pick_device(cfg.device, info)
    check_backends(cfg, device)
    if device.type == "cpu" and not info.distributed:
        torch.set_num_threads(cpu_threads())
    model = build_model(cfg)
    n_params = model.num_parameters()  # before ZeRO-3 partitions the weights away
    runtime = build_runtime(model, cfg, info, device)
    agree_output_dir(cfg, info)
    if hasattr(runtime, "local_numel"):  # every rank: shows the ZeRO-3 split (and the tests read it)
        print(f"rank {info.rank}: holds {runtime.local_numel()} of {n_params} parameters", flush=True)
    streams = build_streams(cfg, model.config, info, micro, build_loader)
    return Run(cfg, info, device, model.config, runtime, n_params, streams,
               Path(cfg.output_dir) if cfg.output_dir else None)


def resume(run: Run, skips: SkipCounters):
    """(first step, the checkpoint resumed from or None): the newest checkpoint that loads (--resume latest
    falls back, naming what it skipped) restores weights, optimizer, generators and every stream."""
    cfg, info = run.cfg, run.info
    candidates = resolve_resume(cfg.resume, cfg.output_dir) if cfg.resume else []
    if not candidates:
        return 0, None
    path, client = load_first_good(run.runtime, candidates, info.rank,
                                   note=lambda m: print(m, flush=True) if info.is_main else None)
    start = int(client["step"])
    if info.is_main and run.out_dir is not None:  # the steps after the checkpoint are logged again
        truncate_metrics(run.out_dir / "metrics.jsonl", start)
    run.streams.load_state_dict(client)
    skips.total.fill_(int(client.get("skipped_steps", 0)))
    return start, path


def announce(run: Run, log: Logger, resume_path: Optional[Path]) -> None:
    """Rank 0: the run's configs beside its outputs, and what it is about to do."""
    cfg, runtime = run.cfg, run.runtime
    if run.out_dir:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (run.out_dir / "config.json").write_text(json.dumps(run.model_config.to_dict(), indent=2))
    log.print(f"m3ae-engine: preset={cfg.preset} params={run.n_params / 1e6:.2f}M device={run.device} "
              f"runtime={runtime.kind} world={run.info.world_size} batch={cfg.batch_size} steps={cfg.total_steps} "
              f"peak_lr={cfg.peak_lr:.2e}" + (f" resumed_from={resume_path}" if resume_path else ""))
    log.print("config: " + json.dumps(cfg.to_dict(), sort_keys=True))
    log.print(log.outputs_line())
    if runtime.kind == "deepspeed":
        log.print("deepspeed config: " + json.dumps(runtime.ds_config, sort_keys=True))


def train_step(run: Run, step: int, lr: float, nan: bool):
    """Forward/backward over the grad-accum micro-steps, then the optimizer step (skipped, on the device,
    when the loss is not finite). Returns (losses [5] on the device: loss, image, text, unpaired text,
    unpaired image; grad norm; skipped flag; the last micro-batch)."""
    cfg, info, device = run.cfg, run.info, run.device
    acc = torch.zeros(5, device=device)  # one all-reduce when logged
    for m in range(cfg.grad_accum):
        batch, inputs, noise = run.streams.next(step, m, info)
        out = run.runtime.forward_backward(inputs, noise, last_micro=m == cfg.grad_accum - 1, nan=nan)
        acc[:3] += _loss_vector(out).to(device) / cfg.grad_accum
        if getattr(out, "unpaired_text_loss", None) is not None:
            acc[3] += out.unpaired_text_loss.detach().float() / cfg.grad_accum
        if getattr(out, "unpaired_image_loss", None) is not None:
            acc[4] += out.unpaired_image_loss.detach().float() / cfg.grad_accum
    norm, bad = run.runtime.step(lr, ~torch.isfinite(acc[0]))
    return acc, norm, bad.to(device), batch


def log_step(run: Run, step: int, lr: float, acc, norm, skips: SkipCounters, batch: dict, rate: float,
             flops_fn, peak) -> dict:
    """The global batch's metrics at a log step: one all-reduce and one host sync for all of them."""
    cfg, info, device = run.cfg, run.info, run.device
    vals = _all_reduce(acc.clone()) / info.world_size
    loss, img, txt, unpaired_loss, unpaired_image_loss = vals.tolist()
    grad_norm, skipped = torch.stack([norm.float().to(device), skips.total.float()]).tolist()
    metrics = {"step": step, "loss": loss, "image_loss": img, "text_loss": txt, "lr": lr,
               "grad_norm": grad_norm, "samples_per_s": rate, "skipped_steps": int(skipped),
               "memory_gb": memory_gb(device), "mfu": None}
    if run.streams.unpaired_text is not None:
        metrics["unpaired_text_loss"] = unpaired_loss
    if run.streams.unpaired_images is not None:
        metrics["unpaired_image_loss"] = unpaired_image_loss
    if peak is not None and cfg.modality == "paired":
        metrics["mfu"] = flops_fn(batch["text_padding_mask"]) * rate / (peak * info.world_size)
    return metrics


def signalled_anywhere(stop: StopRequested, device: torch.device) -> bool:
    """Whether any rank has been sent SIGTERM / SIGINT (all ranks stop at the same step)."""
    flag = torch.tensor(float(stop.signum is not None), device=device)
    return float(_all_reduce(flag, dist.ReduceOp.MAX if dist.is_initialized() else None)) > 0


def finish(run: Run, log: Logger, step: int, stopped: Optional[str], losses: dict, skips: SkipCounters,
           t0: float) -> dict:
    """The final export (a completed run only), the summary line, the result."""
    cfg, info = run.cfg, run.info
    if run.out_dir is not None and stopped is None:
        if info.is_main:
            weights = (consolidated_state_dict(run.ckpt_root / step_dir_name(step))
                       if run.runtime.kind == "deepspeed" else run.runtime.module.state_dict())
            save_exported(weights, run.model_config.to_dict(), run.out_dir / "model.safetensors")
        if dist.is_initialized():
            dist.barrier()
    log.close()
    first = next(iter(losses.values()), None)
    last = next(reversed(losses.values()), None)
    if info.is_main and first is not None:
        print(f"done: loss {first:.4f} -> {last:.4f} in {time.perf_counter() - t0:.1f}s "
              f"({int(skips.total)} skipped steps)", flush=True)
    if info.is_main:
        print(log.outputs_line(final=True), flush=True)
    result = {"losses": losses, "first": first, "last": last, "step": step, "skipped_steps": int(skips.total),
              "stopped": stopped, "runtime": run.runtime}
    if stopped == "non-finite":
        raise TrainingDiverged(f"{int(skips.run_max)} non-finite steps in a row at step {step} "
                               f"(max_bad_steps={cfg.max_bad_steps}); checkpoint saved", result)
    return result


def _train(cfg: TrainConfig, held: list) -> dict:
    run = set_up(cfg)
    info, device, ckpt_root = run.info, run.device, run.ckpt_root
    _take_output_dir(run.out_dir, info, held)  # from here on this run alone writes into OUTPUT_DIR
    if info.is_main and ckpt_root is not None:
        for done in clean_stale_temp(ckpt_root):  # left by a killed run of this folder
            print(f"note: {ckpt_root}: {done}", flush=True)
    skips = SkipCounters(device)
    start, resume_path = resume(run, skips)
    total, warmup = cfg.total_steps, cfg.total_warmup_steps
    if start >= total:  # a preempted job restarted after it finished: nothing to do, not an error
        if info.is_main:
            print(f"m3ae-engine: the checkpoint {resume_path} is at step {start} of {total}: the run is complete "
                  f"(raise --steps to train further)", flush=True)
        return {"losses": {}, "first": None, "last": None, "step": start, "skipped_steps": int(skips.total),
                "stopped": "complete", "runtime": run.runtime}

    log = Logger(info.is_main, total, start, cfg.output_dir, cfg.tensorboard, wandb_project=cfg.wandb_project,
                 wandb_name=cfg.wandb_name, wandb_config=cfg.to_dict())
    every = log_interval(cfg, total)
    if info.is_main:
        announce(run, log, resume_path)
    inject = inject_nan_steps()
    stop = StopRequested()
    bad_watch = BadRunWatch(device)
    flops_fn = flops_per_sample_fn(run.model_config)
    peak = peak_flops(device)
    losses, saved_at, stopped = {}, None, None  # stopped: None, "signal" or "non-finite"

    def checkpoint(step):
        nonlocal saved_at
        if ckpt_root is None or saved_at == step:
            return
        client = {"step": step, **run.streams.state_dict(), "skipped_steps": int(skips.total),
                  "config": cfg.to_dict()}
        save_checkpoint(run.runtime, ckpt_root, step, client, dict(run.meta, step=step), cfg.keep_last,
                        info.rank, checkpoint_crash_hook())
        saved_at = step
        log.print(f"checkpoint: {ckpt_root / step_dir_name(step)}")

    run.streams.start()
    t0, t_log, seen_log = time.perf_counter(), time.perf_counter(), 0
    step = start
    try:
        while step < total:
            lr = warmup_cosine(step, total, warmup, cfg.peak_lr, end_lr=cfg.end_lr)
            acc, norm, bad, batch = train_step(run, step, lr, nan=step in inject)
            skips.add(bad)
            step += 1
            seen_log += cfg.batch_size
            log.advance()

            if step % every == 0 or step == total or step == start + 1:
                now = time.perf_counter()
                metrics = log_step(run, step, lr, acc, norm, skips, batch, seen_log / max(now - t_log, 1e-9),
                                   flops_fn, peak)
                t_log, seen_log = now, 0
                losses[step] = metrics["loss"]
                # the bar shows the lr the next step applies: step 0 of a warm-up applies 0 by the formula
                log.log(metrics, display_lr=warmup_cosine(step, total, warmup, cfg.peak_lr, end_lr=cfg.end_lr)
                        if step < total else lr)
                if signalled_anywhere(stop, device):
                    stopped = "signal"
                    break
            elif stop.signum is not None and not info.distributed:  # single process: react at once
                stopped = "signal"
                break
            # every step, not only at log steps; the last step reads at once (the lagged CUDA read would
            # miss a run of bad steps that reaches --max-bad-steps on the final step)
            run_seen = int(skips.run_max) if step == total else bad_watch.update(skips.run_max)
            if run_seen >= cfg.max_bad_steps:
                stopped = "non-finite"
                log.print(f"error: {run_seen} non-finite steps in a row (max_bad_steps={cfg.max_bad_steps}) "
                          f"at step {step}; the weights are those of the last good step. Saving a "
                          f"checkpoint and stopping. Lower the lr, check the data, or raise --max-bad-steps.")
                break
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total:
                checkpoint(step)
            if cfg.eval_every and step % cfg.eval_every == 0:
                ev = evaluate(run.runtime, cfg, run.model_config, info, run.streams.micro, device)
                ev["step"] = step
                log.print("eval: " + json.dumps(ev))
                log.log(ev)
        checkpoint(step)  # the signal handlers stay installed until this save is complete
    finally:
        stop.restore()
    if stopped == "signal":
        log.print(f"stopped by signal {stop.signum} at step {step}; resume with --resume latest")
    return finish(run, log, step, stopped, losses, skips, t0)


class TrainingDiverged(RuntimeError):
    def __init__(self, msg, result):
        super().__init__(msg)
        self.result = result
