#!/usr/bin/env python
"""End-to-end training throughput: engine vs reference, side by side, in one process.

    python benchmarks/throughput.py                      # large on a GPU (B=256), tiny on the CPU
    python benchmarks/throughput.py --preset base --batch-size 256 --steps 20
    python benchmarks/throughput.py --preset large --max-batch --variants reference,engine

On a CPU the run is a SMOKE TEST of this script (tiny preset, fp32, no fused GPU kernels, attention on
the math path): its numbers say nothing about GPU speed and it says so in its output. Results go to
runs/benchmarks/ on a CPU and to the tracked benchmarks/results/ on a GPU, unless --out-dir says otherwise.

Every variant times full training steps (forward, backward, AdamW step (fused on CUDA), bf16
autocast on a GPU) after warm-up, with CUDA events around each step; the table reports the median.
All variants start from the same weights and see the same pre-generated batches (random uint8
images on the device, random token ids with realistic caption lengths, text and its padding mask on
the CPU as a loader yields them: the engine sizes its packed sequences from the CPU mask).

Variants (see VARIANTS): `reference` (benchmarks/reference_model.py, MAE-style eager PyTorch),
`reference+compile` (the same under torch.compile), `engine` (M3AE, kernels/attention auto,
packed), and ablations that switch one engine feature back: `engine-no-fused-kernels`
(kernels="torch"), `engine-padded` (packed=False), `engine-sdpa` (attention="sdpa").

MFU uses the MODEL FLOPs (m3ae_engine.model.flops.m3ae_flops: the useful work, the same for every
variant); "exec TFLOP/s" uses what the variant's formulation executes (padded layers, heads on all
positions for the reference). Peaks: the device's bf16 dense peak (table below, by device name) and
the bf16 matmul rate measured in this run (8192^3 torch.matmul, median of triton's do_bench).
A variant that fails (OOM, missing backend, compile error) is reported as such and the run goes on.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from m3ae_engine import M3AE, M3AEConfig  # noqa: E402
from m3ae_engine.storage.atomic import atomic_write_text  # noqa: E402
from m3ae_engine.data.build import DECODERS as LOADER_DECODERS  # noqa: E402
from m3ae_engine.model.flops import device_peak_tflops, m3ae_flops  # noqa: E402
from m3ae_engine.train.optim import build_optimizer  # noqa: E402
from reference_model import ReferenceM3AE  # noqa: E402
import report  # noqa: E402

# name -> how to build it. "overrides" are M3AEConfig fields changed for an engine variant.
VARIANTS: Dict[str, dict] = {
    "reference": dict(kind="reference", compile=False),
    "reference+compile": dict(kind="reference", compile=True),
    "engine": dict(kind="engine", overrides={}),
    "engine+compile": dict(kind="engine", overrides={"compile_blocks": True}),
    "engine-no-fused-kernels": dict(kind="engine", overrides={"kernels": "torch"}),
    "engine-padded": dict(kind="engine", overrides={"packed": False}),
    "engine-sdpa": dict(kind="engine", overrides={"attention": "sdpa"}),
}

CPU_NOTE = ("NOTE: CPU run = a smoke test of the benchmark code. The engine's speed comes from GPU kernels "
            "(Triton/CUDA, FlashAttention varlen) that do not run here; CPU samples/s and speed-ups say nothing "
            "about GPU speed. GPU numbers: benchmarks/results/.")

# Caption lengths (BERT WordPiece tokens) of CC12M-like alt-text: lognormal, median 14, sigma 0.6,
# rounded and clipped to [3, text_length]. Mean ~16.7 tokens at text_length 64 (printed per run).
CAPTION_MEDIAN, CAPTION_SIGMA, CAPTION_MIN = 14.0, 0.6, 3


def caption_lengths(batch: int, text_length: int, generator: torch.Generator) -> torch.Tensor:
    """[B] int64 caption lengths from the stated lognormal."""
    z = torch.randn(batch, generator=generator, dtype=torch.float64)
    n = torch.exp(math.log(CAPTION_MEDIAN) + CAPTION_SIGMA * z).round()
    return n.clamp(min(CAPTION_MIN, text_length), text_length).long()


def caption_distribution(text_length: int, text_full: bool) -> dict:
    if text_full:
        return {"name": f"all captions {text_length} tokens (--text-full)", "mean_tokens": float(text_length)}
    n = caption_lengths(200_000, text_length, torch.Generator().manual_seed(1234)).double()
    return {"name": f"lognormal(median {CAPTION_MEDIAN:g}, sigma {CAPTION_SIGMA:g}) rounded, clipped to "
                    f"[{min(CAPTION_MIN, text_length)}, {text_length}] BERT tokens (CC12M-like)",
            "mean_tokens": round(float(n.mean()), 2), "median_tokens": float(n.median()),
            "p90_tokens": float(n.quantile(0.9))}


@dataclasses.dataclass
class Batch:
    image: torch.Tensor  # [B, 3, H, W] uint8 on the device
    text: torch.Tensor  # [B, Lt] int64 on the CPU (pinned on CUDA)
    text_padding_mask: torch.Tensor  # [B, Lt] float32 on the CPU, 1 = padding
    lengths: torch.Tensor  # [B] int64 non-padded caption lengths


def make_batches(n: int, batch: int, config: M3AEConfig, device: torch.device, text_full: bool,
                 seed: int) -> List[Batch]:
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    lt, s = config.text_length, config.image_size
    for _ in range(n):
        image = torch.randint(0, 256, (batch, config.in_channels, s, s), dtype=torch.uint8, device=device,
                              generator=dev_gen)
        lengths = torch.full((batch,), lt) if text_full else caption_lengths(batch, lt, gen)
        pad = (torch.arange(lt)[None, :] >= lengths[:, None]).float()  # [B, Lt]
        text = torch.randint(1, config.vocab_size, (batch, lt), generator=gen) * (1 - pad).long()
        if device.type == "cuda":
            text, pad = text.pin_memory(), pad.pin_memory()
        out.append(Batch(image, text, pad, lengths))
    return out


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------
from _env import environment, error_text, matmul_tflops  # noqa: E402  (device, versions, commit, date; clocks)


# ----------------------------------------------------------------------------------------------
# one variant
# ----------------------------------------------------------------------------------------------
def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "cublas_status_alloc_failed" in msg


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Runner:
    """A variant's model, optimiser and step function."""

    def __init__(self, name: str, base: M3AEConfig, init_state: dict, device: torch.device,
                 deepspeed_config: Optional[dict] = None):
        spec = VARIANTS[name]
        self.name, self.kind, self.device = name, spec["kind"], device
        self.config = dataclasses.replace(base, **spec.get("overrides", {})) if self.kind == "engine" else base
        with torch.device(device):
            model = ReferenceM3AE(self.config) if self.kind == "reference" else M3AE(self.config)
        model.load_state_dict(init_state)
        self.model = model
        self.info: Dict[str, object] = {"kind": self.kind}
        if self.kind == "engine":
            self.info.update(self.engine_backends())
        else:
            self.info.update(kernels="eager torch" + (" + torch.compile" if spec["compile"] else ""),
                             attention="sdpa (padded, key-padding mask)", packed=False)
        self.runtime = None  # DeepSpeed: the trainer's own runtime (ZeRO-3 hooks, config filling, precision)
        if deepspeed_config is not None and self.kind == "engine":
            self.runtime = _deepspeed_runtime(model, deepspeed_config, device)
            self.info["deepspeed"] = {k: self.runtime.ds_config.get(k) for k in ("zero_optimization", "bf16")}
            self.autocast = self.runtime.autocast
        else:
            self.opt = build_optimizer(model, 1e-4, 0.05)
            self.info["optimizer"] = "AdamW fused" if device.type == "cuda" else "AdamW (foreach)"
            self.forward = torch.compile(model) if spec.get("compile") else model
            self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                             else contextlib.nullcontext())

    def engine_backends(self) -> dict:
        """The kernel and attention backends the engine resolves to (and whether packed attention
        really has a varlen implementation, or falls back to the padded math path)."""
        from m3ae_engine.model import attention
        from m3ae_engine import ops
        c, device = self.config, self.device
        attn = attention.resolve_backend(None if c.attention == "auto" else c.attention, device)
        choice = None if c.kernels == "auto" else c.kernels
        per_op = {op: ops.resolve_backend(choice, device, op)
                  for op in ("gather", "unshuffle", "masked_mse", "linear_cross_entropy")}
        kernels = next(iter(per_op.values())) if len(set(per_op.values())) == 1 else \
            ", ".join(f"{op} {name}" for op, name in per_op.items())
        return dict(kernels=kernels, attention=attn, packed=c.packed)

    def step(self, batch: Batch) -> torch.Tensor:
        if self.runtime is not None:
            out = self.runtime.forward_backward(
                {"image": batch.image, "text": batch.text, "text_padding_mask": batch.text_padding_mask},
                (None, None), last_micro=True)
            self.runtime.step(self.runtime.cfg.peak_lr, torch.zeros((), dtype=torch.bool))
            return out.loss.detach()
        with self.autocast:
            out = self.forward(batch.image, batch.text, batch.text_padding_mask)
        loss = out if self.kind == "reference" else out.loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def clear_grads(self):
        for p in self.model.parameters():
            p.grad = None


def _deepspeed_runtime(model, ds: dict, device: torch.device):
    """The engine under m3ae_engine.train.runtime.DeepSpeedRuntime, exactly as train.py runs it: the ZeRO-3
    parameter registration, the tuple output, "auto" fields filled from the run, bf16 off on the CPU."""
    from m3ae_engine.train.runtime import DeepSpeedRuntime, DistInfo
    from m3ae_engine.train.config import TrainConfig
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29517").items():
        os.environ.setdefault(k, v)
    cfg = TrainConfig(preset=ds["preset"], batch_size=ds["batch_size"], deepspeed_config=ds["path"], tensorboard=False)
    return DeepSpeedRuntime(model, cfg, DistInfo(), device)  # checks model.config (compile_blocks vs ZeRO-3)


def time_steps(runner: Runner, batches, steps: int, warmup: int, device: torch.device) -> dict:
    """Median step time (ms) over `steps` steps after `warmup`; batches is a list (cycled) or an iterator."""
    get = (lambda i: batches[i % len(batches)]) if isinstance(batches, list) else (lambda i: next(batches))
    losses = []
    for i in range(warmup):
        losses.append(runner.step(get(i)))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    wall_times = []
    t_start = time.perf_counter()
    waits = []  # host seconds blocked on the next batch (a loader that keeps up: ~0)
    for i in range(steps):
        t0 = time.perf_counter()
        if cuda:
            starts[i].record()
        batch = get(warmup + i)
        waits.append(time.perf_counter() - t0)
        losses.append(runner.step(batch))
        if cuda:
            ends[i].record()
        wall_times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
        step_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        step_ms = [t * 1e3 for t in wall_times]
    wall_s = time.perf_counter() - t_start  # all timed steps, host clock, after the final sync
    loss_values = [float(x) for x in losses]
    if not all(math.isfinite(v) for v in loss_values):
        raise FloatingPointError(f"non-finite loss: {loss_values}")
    q = statistics.quantiles(step_ms, n=10) if len(step_ms) >= 2 else [step_ms[0]] * 9  # deciles
    return {"step_ms": statistics.median(step_ms), "step_ms_min": min(step_ms), "step_ms_max": max(step_ms),
            "step_ms_p10": q[0], "step_ms_p90": q[-1], "timed_steps": len(step_ms),
            "wall_s": wall_s, "data_wait_ms": statistics.median(waits) * 1e3,
            "loss_first": loss_values[0], "loss_last": loss_values[-1]}


def find_max_batch(fits: Callable[[int], bool], start: int, limit: int, tolerance: float = 1 / 16) -> dict:
    """Largest batch b <= limit with fits(b): doubling from `start`, then bisection between the last
    batch that fit and the first that did not, until they are within `tolerance` (relative)."""
    tried = []
    lo, hi, b = 0, None, max(1, min(start, limit))
    while True:
        ok = fits(b)
        tried.append((b, ok))
        if not ok:
            hi = b
            break
        lo = b
        if b >= limit:
            break
        b = min(2 * b, limit)
    while hi is not None and hi - lo > max(1, int(lo * tolerance)):
        mid = (lo + hi) // 2
        ok = fits(mid)
        tried.append((mid, ok))
        lo, hi = (mid, hi) if ok else (lo, mid)
    return {"max_batch": lo, "first_failing": hi, "limit_reached": hi is None, "tries": tried}


def run_variant(name: str, args, base: M3AEConfig, init_state: dict, device: torch.device, batches,
                ds_config) -> dict:
    res = {"variant": name + ("+ds" if ds_config is not None and VARIANTS[name]["kind"] == "engine" else ""),
           "batch_size": args.batch_size, "status": "ok"}
    runner = None
    t0 = time.perf_counter()
    try:
        runner = Runner(name, base, init_state, device, ds_config)
        res.update(runner.info)
        if args.max_batch:
            res.update(_max_batch(runner, args, base, device))
            batches = make_batches(1, res["max_batch"], base, device, args.text_full, args.seed)
            res["batch_size"] = res["max_batch"]
            if res["max_batch"] == 0:
                raise torch.OutOfMemoryError("not even batch 1 fits")
        if device.type == "cuda":
            free_memory(device)
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(args.seed)
        res.update(time_steps(runner, batches, args.steps, args.warmup, device))
        if runner.kind == "engine":
            res.update(runner.engine_backends())  # backends registered lazily during the steps count too
        if device.type == "cuda":
            res["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        res["samples_per_s"] = res["batch_size"] / (res["step_ms"] * 1e-3)  # from the median step
        res["samples_per_s_wall"] = res["batch_size"] * args.steps / res["wall_s"]  # mean over the timed steps
    except Exception as e:  # noqa: BLE001 - a failing variant is a result, the run goes on
        record_failure(res, e)
        if res["status"] == "error":
            res["traceback"] = traceback.format_exc(limit=6)
            print(res["traceback"], file=sys.stderr, flush=True)
    finally:
        res["variant_seconds"] = round(time.perf_counter() - t0, 1)
        del runner
        release_variant(name, device)
    return res


def parse_variants(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return names


def record_failure(res: dict, e: BaseException) -> None:
    """A failing variant is a result (OOM or error), and the run goes on."""
    res["status"] = "OOM" if is_oom(e) else "error"
    res["error"] = error_text(e)


def release_variant(name: str, device: torch.device) -> None:
    """After a variant (its runner deleted): drop compiled graphs and what they hold, free the memory."""
    if VARIANTS[name].get("compile"):
        torch._dynamo.reset()
    free_memory(device)


def _max_batch(runner: Runner, args, base: M3AEConfig, device: torch.device) -> dict:
    def fits(b: int) -> bool:
        oom = False
        try:
            batch = make_batches(1, b, base, device, args.text_full, args.seed)
            for _ in range(2):
                runner.step(batch[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            oom = True
        batch = None
        runner.clear_grads()
        free_memory(device)
        print(f"  {runner.name}: batch {b} {'OOM' if oom else 'fits'}", flush=True)
        return not oom

    out = find_max_batch(fits, args.batch_size, args.max_batch_limit)
    return {"max_batch": out["max_batch"], "max_batch_first_failing": out["first_failing"],
            "max_batch_limit_reached": out["limit_reached"], "max_batch_tries": out["tries"]}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="large" if cuda else "tiny")
    p.add_argument("--batch-size", type=int, default=256 if cuda else 8)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median and p10-p90 spread reported)")
    p.add_argument("--warmup", type=int, default=5 if cuda else 3, help="untimed steps first")
    p.add_argument("--max-batch", action="store_true",
                   help="per variant: find the largest batch that fits (doubling from --batch-size, then "
                        "bisection), then time that batch")
    p.add_argument("--max-batch-limit", type=int, default=8192)
    p.add_argument("--data", choices=("synthetic",) + LOADER_DECODERS, default="synthetic",
                   help="synthetic: pre-generated batches already on the device; auto | dali | nvjpeg | cpu: the "
                        "WebDataset loader with that decoder in the loop (auto: the best available), so the "
                        "step's samples/s and its data_wait_ms show whether it waits on data")
    p.add_argument("--data-path", default=None, help="WebDataset shards for --data LOADER (default: shards of "
                   "synthetic JPEGs of 1-2x the image size, made in a temporary folder)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="run the engine variants through DeepSpeed with this config (the trainer's runtime)")
    p.add_argument("--text-full", action="store_true", help="every caption 64 tokens (no padding)")
    p.add_argument("--num-batches", type=int, default=3, help="pre-generated synthetic batches (cycled)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds; variants not started by then are reported as skipped (0 = no limit)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", "--out", default=None,
                   help="where the JSON/Markdown/PNG go (default: benchmarks/results on a GPU, the tracked GPU "
                        "results; runs/benchmarks on a CPU)")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def loader_batches(args, config: M3AEConfig, device: torch.device):
    """(a function giving each variant a fresh endless iterator of Batch from the WebDataset loader,
    the caption lengths of its first batch, what it is). Without --data-path it first writes shards of
    synthetic JPEGs (1-2x the image size, varied aspect ratios) to a temporary folder."""
    from m3ae_engine.data import build_loader
    from dataloader import make_shards
    paths, source = args.data_path, args.data_path
    if paths is None:
        n = max(4 * args.batch_size, 64)
        tmp = tempfile.mkdtemp(prefix="m3ae-throughput-shards-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        paths = make_shards(tmp, n, 256, config.image_size, 2 * config.image_size, seed=args.seed)
        source = f"{n} synthetic JPEGs of {config.image_size}-{2 * config.image_size} px in {len(paths)} shards"
    loader = build_loader(paths, batch_size=args.batch_size, image_size=config.image_size,
                          text_length=config.text_length, decoder=args.data, device=str(device), seed=args.seed)

    def batches():  # the loaders resume where the last iterator stopped; a variant's failure ends only its own
        for b in loader:
            pad = b["text_padding_mask"]
            yield Batch(b["image"], b["text"], pad, (1 - pad.float()).sum(1).long().cpu())
    first_lengths = next(batches()).lengths  # for the FLOPs: these captions, not the stated distribution
    return batches, first_lengths, {"loader": loader.decoder, "threads": loader.threads, "source": source}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = parse_variants(args.variants)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: --batch-size and --steps must be >= 1, --warmup >= 0")
    if args.max_batch and args.data != "synthetic":
        raise SystemExit(f"error: --max-batch uses synthetic batches; drop --data {args.data}")
    if args.max_batch and args.deepspeed_config:
        raise SystemExit("error: --max-batch probes OOMs, which leave DeepSpeed's ZeRO buffers in an undefined "
                         "state; drop --deepspeed_config (or find the batch with --batch-size runs)")
    ds_config = None
    if args.deepspeed_config:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise SystemExit("error: --deepspeed_config needs DeepSpeed installed (pip install deepspeed)")
        if not Path(args.deepspeed_config).is_file():
            raise SystemExit(f"error: --deepspeed_config {args.deepspeed_config}: no such file")
        ds_config = {"path": args.deepspeed_config, "preset": args.preset, "batch_size": args.batch_size}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.out_dir is None:
        args.out_dir = str(ROOT / ("benchmarks/results" if device.type == "cuda" else "runs/benchmarks"))
    smoke = CPU_NOTE if device.type != "cuda" else None
    if smoke:
        print(smoke, flush=True)
    t_start = time.perf_counter()
    base = M3AEConfig.from_preset(args.preset)
    torch.manual_seed(args.seed)
    init_state = {k: v.detach().clone() for k, v in M3AE(base).state_dict().items()}  # shared initial weights

    env = environment(device)
    print(f"throughput: {env['device']} torch {env['torch']} triton {env['triton']} cuda {env['cuda']} "
          f"commit {env['git_commit'][:12]}", flush=True)
    matmul = matmul_tflops(device)
    peak = device_peak_tflops(env["device"]) if device.type == "cuda" else None
    print(f"measured {matmul['dtype']} matmul {matmul['size']}^3: {matmul['tflops']:.1f} TFLOP/s; "
          f"device bf16 dense peak: {peak if peak else 'unknown (MFU vs measured only)'}", flush=True)

    dist = caption_distribution(base.text_length, args.text_full)
    data_info = {"loader": None, "source": "synthetic batches pre-generated on the device"}
    new_iterator = None
    if args.data != "synthetic":
        new_iterator, lengths, data_info = loader_batches(args, base, device)
        lengths = lengths.double()
        dist["batch_mean_tokens"] = round(float(lengths.mean()), 2)
        print(f"data: {data_info}", flush=True)
    else:
        batches = make_batches(args.num_batches, args.batch_size, base, device, args.text_full, args.seed)
        lengths = torch.cat([b.lengths for b in batches]).double()
        dist["batch_mean_tokens"] = round(float(lengths.mean()), 2)
    print(f"captions: {dist['name']}; mean {dist['mean_tokens']} tokens", flush=True)
    # FLOPs per sample from the batches' actual caption lengths (a loader: those of its first batch)
    flops = {"model_per_sample": m3ae_flops(base, lengths),
             "reference_per_sample": m3ae_flops(base, lengths, padded=True, heads_on_all=True),
             "padded_per_sample": m3ae_flops(base, lengths, padded=True),
             "model_breakdown_per_sample": m3ae_flops(base, lengths, breakdown=True)}
    executed = {"reference": flops["reference_per_sample"], "engine-padded": flops["padded_per_sample"]}

    result = {"meta": env, "args": vars(args), "preset": args.preset, "config": base.to_dict(), "note": smoke,
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32 (CPU)",
              "captions": dist, "data": data_info, "matmul": matmul, "peak_bf16_tflops": peak, "flops": flops,
              "num_parameters": sum(v.numel() for v in init_state.values()), "results": []}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"throughput_{args.preset}_b{args.batch_size}{'_maxbatch' if args.max_batch else ''}"
            f"{'_textfull' if args.text_full else ''}_{report.slug(env['device'])}_"
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S')}{args.tag}")
    json_path = out_dir / f"{stem}.json"

    for name in names:
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            res = {"variant": name, "status": "skipped", "error": f"--time-limit {args.time_limit:g}s reached"}
        else:
            print(f"[{name}] ...", flush=True)
            res = run_variant(name, args, base, init_state, device, new_iterator() if new_iterator else batches,
                              ds_config)
        if res["status"] == "ok":
            fps = executed.get(name.replace("+compile", ""), flops["model_per_sample"])
            res["model_tflops"] = res["samples_per_s"] * flops["model_per_sample"] / 1e12
            res["executed_flops_per_sample"] = fps
            res["executed_tflops"] = res["samples_per_s"] * fps / 1e12
            res["mfu_vs_measured_matmul"] = res["model_tflops"] / matmul["tflops"]
            res["mfu_vs_peak"] = res["model_tflops"] / peak if peak else None
        result["results"].append(res)
        print(f"[{name}] {res['status']}" + (f": {res['samples_per_s']:.1f} samples/s, {res['step_ms']:.1f} ms "
                                             f"(p10-p90 {res['step_ms_p10']:.1f}-{res['step_ms_p90']:.1f})"
                                             if res["status"] == "ok" else f": {res.get('error', '')}"), flush=True)
        report.add_speedups(result)
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str))  # after every variant: a crash keeps results

    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(json_path, json.dumps(result, indent=2, default=str))
    md = report.markdown(result)
    (out_dir / f"{stem}.md").write_text(md)
    png = report.plot(result, out_dir / f"{stem}.png")
    print(f"\nwrote {json_path}" + (f", {png}" if png else " (no PNG: matplotlib missing)") +
          f", {out_dir / (stem + '.md')}\n", flush=True)
    print(md, flush=True)
    if smoke:
        print(smoke, flush=True)
    result["json_path"] = str(json_path)
    return result


if __name__ == "__main__":
    main()
