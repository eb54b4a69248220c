"""The training loop: data -> masked forward/backward -> skip-or-step -> log / eval / checkpoint.

One loop for every launch mode (python, torchrun, deepspeed); runtime.py hides plain/DDP/DeepSpeed.
The hot loop never waits for the device except at the log interval: losses, skip flags and counters
stay on the device until then.

Determinism across world sizes: the masks are drawn from a generator seeded by (seed, step) for the
whole GLOBAL batch, and each rank takes the rows of its own samples (the data is split the same way).
So 2 ranks x 4 samples see exactly the masks of 1 rank x 8, and a resumed run draws what the
uninterrupted one did (the generator state is a function of the step, not of history).
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (all_ranks_ok, clean_stale_temp, consolidated_state_dict, load_first_good, resolve_resume,
                         save_checkpoint, save_exported, step_dir_name, truncate_metrics)
from ..model.config import ConfigError, M3AEConfig
from ..data.sources import expand_braces, split_sources
from .logger import Logger, flops_per_sample_fn, memory_gb, peak_flops
from ..model.m3ae import M3AE
from .optim import warmup_cosine
from .output_lock import OutputDirInUse, OutputDirLock
from .runtime import DistInfo, build_runtime, dist_from_env, forward_micro_batch, micro_per_rank, pick_device
from .config import TrainConfig

UNPAIRED_SEED_OFFSET = 7_777_777  # unpaired text draws its own captions and masks
UNPAIRED_IMAGE_SEED_OFFSET = 5_555_557  # unpaired images draw their own images and masks
EVAL_SEED_OFFSET = 1_000_003  # eval batches and masks come from a stream training never reads


class MaskNoise:
    """Uniform masking noise for the rows of this rank's micro-batch (see module docstring)."""

    def __init__(self, seed: int, num_patches: int, text_length: int, global_batch: int, sharing: str):
        self.seed, self.li, self.lt, self.g, self.sharing = seed, num_patches, text_length, global_batch, sharing
        self.gen = torch.Generator()
        self._cached = (None, None)

    def __call__(self, step: int, micro: int, rank: int, world: int, batch: int):
        if self.sharing == "batch":  # official M3AE: one permutation per device and micro-batch
            self.gen.manual_seed(hash((self.seed, step, micro, rank)) & 0x7FFFFFFFFFFF)
            rows = torch.rand(1, self.li + self.lt, generator=self.gen)
        else:
            if self._cached[0] != step:
                self.gen.manual_seed((self.seed * 1_000_003 + step) & 0x7FFFFFFFFFFF)
                self._cached = (step, torch.rand(self.g, self.li + self.lt, generator=self.gen))
            off = (micro * world + rank) * batch
            rows = self._cached[1][off:off + batch]
        return rows[:, :self.li], rows[:, self.li:]


def _require_files(spec: str, flag: str) -> None:
    """A data pattern that matches no file at all is a config error, raised before any work (the
    loader itself then names any single missing or unreadable shard)."""
    import glob
    for pattern in expand_braces(spec):
        if glob.glob(pattern) if any(c in pattern for c in "*?[") else Path(pattern).exists():
            return
    raise ConfigError(f"{flag}: no file matches {spec!r} (missing data path)")


def check_data(cfg: TrainConfig):
    """Fail before any work when a data pattern matches no file (paired data and unpaired text);
    returns the shard loader's builder, or None for synthetic data."""
    if cfg.unpaired_text_data not in (None, "synthetic"):
        for spec in split_sources(cfg.unpaired_text_data):
            _require_files(spec, "--unpaired-text-data")
    if cfg.unpaired_image_data not in (None, "synthetic"):
        for spec in split_sources(cfg.unpaired_image_data):
            _require_files(spec, "--unpaired-image-data")
    if cfg.data == "synthetic":
        return None
    from ..data import build_loader
    for spec in split_sources(cfg.data):
        _require_files(spec, "--data")
    return build_loader


def text_drop_options(cfg: TrainConfig) -> dict:
    """Partial pairing (official deterministic_drop_text / random_drop_text) for the training data's
    loader; empty when every caption is kept, so loaders see no new option in a plain run."""
    if cfg.paired_fraction == 1 and cfg.random_drop_text == 0:
        return {}
    return {"paired_fraction": cfg.paired_fraction, "random_drop_text": cfg.random_drop_text}


def build_data(cfg: TrainConfig, model_config: M3AEConfig, info: DistInfo, micro: int, build_loader=None,
               seed: Optional[int] = None, drop_text: bool = True):
    """The paired (or MAE-mode image) training data; drop_text=False: every caption kept (held-out eval)."""
    drop = text_drop_options(cfg) if drop_text else {}
    if build_loader is None:
        from ..data import SyntheticBatches
        return SyntheticBatches(micro, model_config.image_size, model_config.text_length,
                                seed=cfg.seed if seed is None else seed, size=cfg.dataset_size,
                                rank=info.rank, world_size=info.world_size, **drop)
    return build_loader(split_sources(cfg.data), batch_size=micro, image_size=model_config.image_size,
                        text_length=model_config.text_length, seed=cfg.seed, rank=info.rank,
                        world_size=info.world_size, **image_loader_options(cfg, info),
                        modality="image" if cfg.modality == "image" else "paired", **drop)


def image_loader_options(cfg: TrainConfig, info: DistInfo) -> dict:
    """Workers and decode device of a loader that decodes images: this rank's GPU, capped workers."""
    return dict(num_workers=capped_workers(cfg.num_workers, info),
                device=f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or Slurm's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def capped_workers(requested: int, info: DistInfo) -> int:
    """DataLoader workers <= this rank's share of the available cores (more only oversubscribe them)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cap = max(1, available_cores() // max(1, local_ranks))
    if requested > cap:
        if info.is_main:
            print(f"note: --num-workers {requested} reduced to {cap}: {available_cores()} core(s) available to "
                  f"{local_ranks} rank(s) on this machine", flush=True)
        return cap
    return requested


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


def build_unpaired(cfg: TrainConfig, model_config: M3AEConfig, info: DistInfo, micro: int, modality: str):
    """Batches of one modality for an unpaired term: "text" (the official unpaired text term:
    synthetic captions, or text files / text shards) or "image" (image-only forwards: synthetic
    images, or image-only / paired shards read without their captions); None when not asked for.
    Each has its own seed, so it draws other samples than the paired stream."""
    spec, offset = ((cfg.unpaired_text_data, UNPAIRED_SEED_OFFSET) if modality == "text"
                    else (cfg.unpaired_image_data, UNPAIRED_IMAGE_SEED_OFFSET))
    if spec is None:
        return None
    if spec == "synthetic":  # the unused half (images of the text term, captions of the image term) is dropped
        from ..data import SyntheticBatches
        return SyntheticBatches(micro, model_config.image_size, model_config.text_length,
                                seed=cfg.seed + offset, rank=info.rank, world_size=info.world_size)
    from ..data import build_loader
    image_kw = image_loader_options(cfg, info) if modality == "image" else {}
    return build_loader(split_sources(spec), batch_size=micro, image_size=model_config.image_size,
                        text_length=model_config.text_length, seed=cfg.seed + offset,
                        rank=info.rank, world_size=info.world_size, modality=modality, **image_kw)


def unpaired_image_per_rank(cfg: TrainConfig, info: DistInfo) -> int:
    """Image-only samples per rank per micro-step: unpaired_image_ratio x batch_size over all ranks and
    micro-steps, which must divide evenly (as the paired batch) so 2 ranks see what 1 rank sees."""
    if cfg.unpaired_image_data is None:
        return 0
    total = cfg.unpaired_image_batch_size
    if total % (cfg.grad_accum * info.world_size):
        raise ConfigError(f"unpaired_image_ratio x batch_size = {total} image-only samples per step must be "
                          f"divisible by grad_accum x world size = {cfg.grad_accum} x {info.world_size}")
    return total // (cfg.grad_accum * info.world_size)


def micro_batch(batch: dict, modality: str, unpaired: Optional[dict], unpaired_noise,
                unpaired_image: Optional[dict] = None, unpaired_image_noise=None) -> dict:
    """The dict the runtime's forward reads: image-only in MAE mode, plus the unpaired text and the
    unpaired images if any."""
    out = {"image": batch["image"]} if modality == "image" else dict(batch)
    if unpaired is not None:
        out.update(unpaired_text=unpaired["text"], unpaired_text_padding_mask=unpaired["text_padding_mask"],
                   unpaired_text_noise=unpaired_noise)
    if unpaired_image is not None:
        out.update(unpaired_image=unpaired_image["image"], unpaired_image_noise=unpaired_image_noise)
    return out


def cpu_threads() -> int:
    """Threads of a single-process CPU run: all logical CPUs, or $M3AE_CPU_THREADS (e.g. 1 on a shared,
    loaded machine, where OpenMP's barriers stall whenever one of its threads is descheduled)."""
    value = os.environ.get("M3AE_CPU_THREADS", "")
    if not value:
        return max(1, os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"M3AE_CPU_THREADS must be a positive integer, got {value!r}")
    return int(value)


def _inject_steps():
    env = os.environ.get("M3AE_INJECT_NAN_STEPS", "")
    return {int(s) for s in env.split(",") if s.strip()}


def _crash_hook():
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


def _take_output_dir(out_dir: Optional[Path], info: DistInfo, held: list) -> None:
    """Rank 0 locks OUTPUT_DIR (run_lock.py); every rank learns the outcome, so a second run stops on all
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


def _train(cfg: TrainConfig, held: list) -> dict:
    info = dist_from_env()
    build_loader = check_data(cfg)  # before any work: a missing path fails in a second, not after init
    micro = micro_per_rank(cfg, info)  # samples per rank per micro-step
    device = pick_device(cfg.device, info)
    # a named kernel or attention backend that cannot run here fails now, not at the first forward
    from ..model import attention as attention_backends
    from .. import ops
    if cfg.kernels != "auto":
        ops.resolve_backend(cfg.kernels, device)
    if cfg.attention != "auto":
        attention_backends.resolve_backend(cfg.attention, device)
    if device.type == "cpu" and not info.distributed:
        torch.set_num_threads(cpu_threads())
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same init on every rank: DDP / ZeRO start from identical replicas
    model_config = M3AEConfig.from_preset(cfg.preset, **cfg.model_overrides())
    model = M3AE(model_config)
    if cfg.modality == "image" and cfg.unpaired_text_data is None:
        # MAE mode never runs the text path: freeze its parameters so DDP does not wait for their
        # gradients and AdamW does not decay them
        for p in model.text_parameters():
            p.requires_grad_(False)
    n_params = model.num_parameters()  # before ZeRO-3 partitions the weights away
    runtime = build_runtime(model, cfg, info, device)
    agree_output_dir(cfg, info)
    if hasattr(runtime, "local_numel"):  # every rank: shows the ZeRO-3 split (and the tests read it)
        print(f"rank {info.rank}: holds {runtime.local_numel()} of {n_params} parameters", flush=True)
    data = build_data(cfg, model_config, info, micro, build_loader)
    noise = MaskNoise(cfg.seed, model_config.num_patches, model_config.text_length, cfg.batch_size,
                      model_config.mask_sharing)
    unpaired_data = build_unpaired(cfg, model_config, info, micro, "text")
    unpaired_noise = MaskNoise(cfg.seed + UNPAIRED_SEED_OFFSET, model_config.num_patches, model_config.text_length,
                               cfg.batch_size, model_config.mask_sharing)
    micro_img = unpaired_image_per_rank(cfg, info)
    unpaired_image_data = unpaired_image_noise = None
    if micro_img:
        unpaired_image_data = build_unpaired(cfg, model_config, info, micro_img, "image")
        unpaired_image_noise = MaskNoise(cfg.seed + UNPAIRED_IMAGE_SEED_OFFSET, model_config.num_patches,
                                         model_config.text_length, cfg.unpaired_image_batch_size,
                                         model_config.mask_sharing)
    total, warmup = cfg.total_steps, cfg.total_warmup_steps
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    ckpt_root = out_dir / "checkpoints" if out_dir else None
    meta = {"train_config": cfg.to_dict(), "model_config": model_config.to_dict(), "runtime": runtime.kind,
            "world_size": info.world_size}

    _take_output_dir(out_dir, info, held)  # from here on this run alone writes into OUTPUT_DIR
    if info.is_main and ckpt_root is not None:
        for done in clean_stale_temp(ckpt_root):  # left by a killed run of this folder
            print(f"note: {ckpt_root}: {done}", flush=True)

    # ---- resume ----
    start = 0
    bad_total = torch.zeros((), dtype=torch.long, device=device)  # skipped steps, on the device
    bad_run = torch.zeros((), dtype=torch.long, device=device)  # current run of consecutive skips
    bad_run_max = torch.zeros((), dtype=torch.long, device=device)
    candidates = resolve_resume(cfg.resume, cfg.output_dir) if cfg.resume else []
    resume_path = None
    if candidates:  # the newest that loads (--resume latest falls back, naming what it skipped)
        resume_path, client = load_first_good(runtime, candidates, info.rank,
                                              note=lambda m: print(m, flush=True) if info.is_main else None)
        start = int(client["step"])
        if info.is_main and out_dir is not None:  # the steps after the checkpoint are logged again
            truncate_metrics(out_dir / "metrics.jsonl", start)
        if hasattr(data, "load_state_dict") and client.get("data") is not None:
            data.load_state_dict(client["data"])
        if unpaired_data is not None and client.get("unpaired_text_data") is not None:
            unpaired_data.load_state_dict(client["unpaired_text_data"])
        if unpaired_image_data is not None and client.get("unpaired_image_data") is not None:
            unpaired_image_data.load_state_dict(client["unpaired_image_data"])
        bad_total.fill_(int(client.get("skipped_steps", 0)))
    if start >= total:  # a preempted job restarted after it finished: nothing to do, not an error
        if info.is_main:
            print(f"m3ae-engine: the checkpoint {resume_path} is at step {start} of {total}: the run is complete "
                  f"(raise --steps to train further)", flush=True)
        return {"losses": {}, "first": None, "last": None, "step": start, "skipped_steps": int(bad_total),
                "stopped": "complete", "runtime": runtime}

    log = Logger(info.is_main, total, start, cfg.output_dir, cfg.tensorboard, wandb_project=cfg.wandb_project,
                 wandb_name=cfg.wandb_name, wandb_config=cfg.to_dict())
    every = log_interval(cfg, total)
    if info.is_main:
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            (out_dir / "config.json").write_text(json.dumps(model_config.to_dict(), indent=2))
        log.print(f"m3ae-engine: preset={cfg.preset} params={n_params / 1e6:.2f}M device={device} "
                  f"runtime={runtime.kind} world={info.world_size} batch={cfg.batch_size} steps={total} "
                  f"peak_lr={cfg.peak_lr:.2e}" + (f" resumed_from={resume_path}" if resume_path else ""))
        log.print("config: " + json.dumps(cfg.to_dict(), sort_keys=True))
        log.print(log.outputs_line())
        if runtime.kind == "deepspeed":
            log.print("deepspeed config: " + json.dumps(runtime.ds_config, sort_keys=True))

    inject = _inject_steps()
    stop = StopRequested()
    bad_watch = BadRunWatch(device)
    flops_fn = flops_per_sample_fn(model_config)
    peak = peak_flops(device)
    losses, saved_at, stopped = {}, None, None  # stopped: None, "signal" or "non-finite"

    def client_state(step):
        return {"step": step, "data": data.state_dict() if hasattr(data, "state_dict") else None,
                "unpaired_text_data": (unpaired_data.state_dict() if hasattr(unpaired_data, "state_dict")
                                       else None),
                "unpaired_image_data": (unpaired_image_data.state_dict()
                                        if hasattr(unpaired_image_data, "state_dict") else None),
                "skipped_steps": int(bad_total), "config": cfg.to_dict()}

    def checkpoint(step):
        nonlocal saved_at
        if ckpt_root is None or saved_at == step:
            return
        save_checkpoint(runtime, ckpt_root, step, client_state(step), dict(meta, step=step), cfg.keep_last,
                        info.rank, _crash_hook())
        saved_at = step
        log.print(f"checkpoint: {ckpt_root / step_dir_name(step)}")

    data_iter = iter(data)
    unpaired_iter = iter(unpaired_data) if unpaired_data is not None else None
    unpaired_image_iter = iter(unpaired_image_data) if unpaired_image_data is not None else None
    t0, t_log, seen_log = time.perf_counter(), time.perf_counter(), 0
    step = start
    try:
        while step < total:
            lr = warmup_cosine(step, total, warmup, cfg.peak_lr, end_lr=cfg.end_lr)
            # loss, image, text, unpaired text, unpaired image: one all-reduce when logged
            acc = torch.zeros(5, device=device)
            for m in range(cfg.grad_accum):
                batch = next(data_iter)
                unpaired = next(unpaired_iter) if unpaired_iter is not None else None
                u_noise = unpaired_noise(step, m, info.rank, info.world_size, micro)[1] if unpaired else None
                u_image = next(unpaired_image_iter) if unpaired_image_iter is not None else None
                ui_noise = (unpaired_image_noise(step, m, info.rank, info.world_size, micro_img)[0]
                            if u_image else None)
                out = runtime.forward_backward(micro_batch(batch, cfg.modality, unpaired, u_noise, u_image, ui_noise),
                                               noise(step, m, info.rank, info.world_size, micro),
                                               last_micro=m == cfg.grad_accum - 1, nan=step in inject)
                acc[:3] += _loss_vector(out).to(device) / cfg.grad_accum
                if getattr(out, "unpaired_text_loss", None) is not None:
                    acc[3] += out.unpaired_text_loss.detach().float() / cfg.grad_accum
                if getattr(out, "unpaired_image_loss", None) is not None:
                    acc[4] += out.unpaired_image_loss.detach().float() / cfg.grad_accum
            norm, bad = runtime.step(lr, ~torch.isfinite(acc[0]))
            bad = bad.to(device)
            bad_total += bad.long()
            bad_run.mul_(bad.long()).add_(bad.long())  # consecutive skips; reset by a good step
            torch.maximum(bad_run_max, bad_run, out=bad_run_max)
            step += 1
            seen_log += cfg.batch_size
            log.advance()

            if step % every == 0 or step == total or step == start + 1:
                vals = _all_reduce(acc.clone()) / info.world_size  # the global batch's losses
                loss, img, txt, unpaired_loss, unpaired_image_loss = vals.tolist()  # one host sync for all
                grad_norm, skipped = torch.stack([norm.float().to(device), bad_total.float()]).tolist()
                skipped = int(skipped)
                now = time.perf_counter()
                rate = seen_log / max(now - t_log, 1e-9)
                t_log, seen_log = now, 0
                metrics = {"step": step, "loss": loss, "image_loss": img, "text_loss": txt, "lr": lr,
                           "grad_norm": grad_norm, "samples_per_s": rate, "skipped_steps": skipped,
                           "memory_gb": memory_gb(device), "mfu": None}
                if unpaired_iter is not None:
                    metrics["unpaired_text_loss"] = unpaired_loss
                if unpaired_image_iter is not None:
                    metrics["unpaired_image_loss"] = unpaired_image_loss
                if peak is not None and cfg.modality == "paired":
                    metrics["mfu"] = flops_fn(batch["text_padding_mask"]) * rate / (peak * info.world_size)
                losses[step] = loss
                # the bar shows the lr the next step applies: step 0 of a warm-up applies 0 by the formula
                log.log(metrics, display_lr=warmup_cosine(step, total, warmup, cfg.peak_lr, end_lr=cfg.end_lr)
                        if step < total else lr)
                signalled = torch.tensor(float(stop.signum is not None), device=device)
                if float(_all_reduce(signalled, dist.ReduceOp.MAX if dist.is_initialized() else None)) > 0:
                    stopped = "signal"
                    break
            elif stop.signum is not None and not info.distributed:  # single process: react at once
                stopped = "signal"
                break
            # every step, not only at log steps; the last step reads at once (the lagged CUDA read would
            # miss a run of bad steps that reaches --max-bad-steps on the final step)
            run_seen = int(bad_run_max) if step == total else bad_watch.update(bad_run_max)
            if run_seen >= cfg.max_bad_steps:
                stopped = "non-finite"
                log.print(f"error: {run_seen} non-finite steps in a row (max_bad_steps={cfg.max_bad_steps}) "
                          f"at step {step}; the weights are those of the last good step. Saving a "
                          f"checkpoint and stopping. Lower the lr, check the data, or raise --max-bad-steps.")
                break
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total:
                checkpoint(step)
            if cfg.eval_every and step % cfg.eval_every == 0:
                ev = evaluate(runtime, cfg, model_config, info, micro, device)
                ev["step"] = step
                log.print("eval: " + json.dumps(ev))
                log.log(ev)
        checkpoint(step)  # the signal handlers stay installed until this save is complete
    finally:
        stop.restore()
    if stopped == "signal":
        log.print(f"stopped by signal {stop.signum} at step {step}; resume with --resume latest")
    if out_dir is not None and stopped is None:
        if info.is_main:
            weights = (consolidated_state_dict(ckpt_root / step_dir_name(step)) if runtime.kind == "deepspeed"
                       else runtime.module.state_dict())
            save_exported(weights, model_config.to_dict(), out_dir / "model.safetensors")
        if dist.is_initialized():
            dist.barrier()
    log.close()
    first = next(iter(losses.values()), None)
    last = next(reversed(losses.values()), None)
    if info.is_main and first is not None:
        print(f"done: loss {first:.4f} -> {last:.4f} in {time.perf_counter() - t0:.1f}s "
              f"({int(bad_total)} skipped steps)", flush=True)
    if info.is_main:
        print(log.outputs_line(final=True), flush=True)
    result = {"losses": losses, "first": first, "last": last, "step": step, "skipped_steps": int(bad_total),
              "stopped": stopped, "runtime": runtime}
    if stopped == "non-finite":
        raise TrainingDiverged(f"{int(bad_run_max)} non-finite steps in a row at step {step} "
                               f"(max_bad_steps={cfg.max_bad_steps}); checkpoint saved", result)
    return result


class TrainingDiverged(RuntimeError):
    def __init__(self, msg, result):
        super().__init__(msg)
        self.result = result
