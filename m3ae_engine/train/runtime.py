"""How the model is placed, wrapped and stepped: plain PyTorch (one process or DDP) or DeepSpeed ZeRO.

Both runtimes expose the same five calls to the training loop (loop.py):
  forward_backward(batch, noise, ...) -> M3AEOutput   one micro-batch, gradients accumulated
  step(lr, loss_bad) -> (grad_norm, bad)               optimizer step, SKIPPED when anything is non-finite
  save(dir, client_state) / load(dir) -> client_state  checkpoint files of this runtime
  module                                               the bare M3AE (full weights except under ZeRO-3)

Skipping without a host sync (plain path): the step is taken with fused AdamW's `found_inf`, the
device-side flag GradScaler uses: when it is 1 the kernel leaves weights, moments and the step count
untouched. DeepSpeed syncs the host at every step anyway (its overflow check), so there we ask it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ..model.config import ConfigError
from ..model.m3ae import M3AE
from .optim import build_optimizer


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> DistInfo:
    """torchrun and the deepspeed launcher both set RANK / WORLD_SIZE / LOCAL_RANK."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(requested, info: DistInfo) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda requested but torch.cuda.is_available() is False")
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA unless fp32 is asked; the CPU always runs fp32 (bf16 CPU matmuls are slow)."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _losses(out):
    """(loss, image_loss, text_loss) from M3AE's output or the DeepSpeed runtime's tuple."""
    return out if isinstance(out, tuple) else (out.loss, out.image_loss, out.text_loss)


def forward_micro_batch(model, batch, noise, device, unpaired_weight: float = 0.0):
    """One micro-batch: the paired (or image-only) forward, plus the official unpaired text term
    (`batch["unpaired_text"]`, a text-only forward weighted by `unpaired_weight`) and the unpaired image
    term (`batch["unpaired_image"]`, an image-only forward whose loss is image_loss_weight x its image
    loss: weighted as the paired image loss) when present."""
    image_noise, text_noise = noise
    kw = {}
    if batch.get("image") is not None:
        kw.update(image=batch["image"].to(device, non_blocking=True), image_noise=image_noise)
    if batch.get("text") is not None:
        kw.update(text=batch["text"], text_padding_mask=batch["text_padding_mask"], text_noise=text_noise)
    loss, image_loss, text_loss = _losses(model(**kw))
    unpaired = None
    if batch.get("unpaired_text") is not None and unpaired_weight > 0:
        _, _, unpaired = _losses(model(text=batch["unpaired_text"],
                                       text_padding_mask=batch["unpaired_text_padding_mask"],
                                       text_noise=batch.get("unpaired_text_noise")))
        loss = loss + unpaired_weight * unpaired
    unpaired_image = None
    if batch.get("unpaired_image") is not None:
        image_only_loss, unpaired_image, _ = _losses(model(image=batch["unpaired_image"].to(device, non_blocking=True),
                                                           image_noise=batch.get("unpaired_image_noise")))
        loss = loss + image_only_loss  # the model's image-only loss: image_loss_weight x image loss
    return SimpleNamespace(loss=loss, image_loss=image_loss, text_loss=text_loss, unpaired_text_loss=unpaired,
                           unpaired_image_loss=unpaired_image)


def inject(loss: torch.Tensor, nan: bool) -> torch.Tensor:
    """Test hook (M3AE_INJECT_NAN_STEPS): poison the loss, hence every gradient, of chosen steps."""
    return loss * float("nan") if nan else loss


class PlainRuntime:
    """One process, or torch DDP under torchrun. Gradients all-reduced by DDP at the last micro-step."""

    kind = "torch"

    def __init__(self, model, cfg, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.module = model.to(device)
        self.model = model
        if info.distributed:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        # fused AdamW on CPU and CUDA: it is what takes the device-side skip flag (found_inf)
        self.optimizer = build_optimizer(model, cfg.peak_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = autocast_for(device, cfg.precision)

    def forward_backward(self, batch, noise, last_micro: bool, nan: bool = False):
        sync = contextlib.nullcontext() if last_micro or not self.info.distributed else self.model.no_sync()
        with sync:
            with self.autocast:
                out = forward_micro_batch(self.model, batch, noise, self.device, self.cfg.unpaired_text_loss_weight)
            (inject(out.loss, nan) / self.cfg.grad_accum).backward()
        return out

    def step(self, lr: float, loss_bad: torch.Tensor):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # [] on device, no sync
        bad = (~torch.isfinite(norm)) | loss_bad.to(norm.device)
        if self.info.distributed:  # every rank must skip the same steps or the replicas drift apart
            flag = bad.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag > 0
        self.optimizer.found_inf = bad.float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), bad

    def save(self, path: Path, client_state: dict) -> None:
        if self.info.is_main:  # replicas are identical: rank 0 writes the whole state
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "client_state": client_state}, path / "state.pt")

    def load(self, path: Path) -> dict:
        from .checkpoint import CheckpointError, load_weights_only
        file = path / "state.pt"
        state = load_weights_only(file, map_location=self.device)  # refuses anything that could run code
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            return state["client_state"]
        except (KeyError, TypeError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{file}: does not fit this model/optimizer ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def micro_per_rank(cfg, info: DistInfo) -> int:
    """Samples per rank per micro-step: batch_size / grad_accum / world size, which must divide."""
    micro = cfg.batch_size // cfg.grad_accum
    if micro % info.world_size:
        raise ConfigError(f"batch_size/grad_accum = {micro} must be divisible by the world size {info.world_size}")
    return micro // info.world_size


def prepare_ds_config(path: str, cfg, info: DistInfo, device: torch.device) -> dict:
    """Read a DeepSpeed JSON and fill the batch sizes, clipping and optimizer hyper-parameters from the
    TrainConfig ("auto" or absent fields). Explicit values that disagree are an error, not a surprise."""
    ds = json.loads(Path(path).read_text())
    want = {"train_batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "train_micro_batch_size_per_gpu": micro_per_rank(cfg, info)}
    for key, value in want.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: {key}={ds[key]} disagrees with the run ({value} from --batch-size "
                              f"{cfg.batch_size}, --grad-accum {cfg.grad_accum}, {info.world_size} ranks); "
                              f"set it to \"auto\"")
        ds[key] = value
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.grad_clip
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", cfg.peak_lr), ("betas", [cfg.beta1, cfg.beta2]),
                           ("weight_decay", cfg.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    if device.type != "cuda":  # the CPU (gloo) runs of the tests: no half precision, same ZeRO layout
        for key in ("bf16", "fp16"):
            if ds.get(key, {}).get("enabled", False):
                ds[key] = dict(ds[key], enabled=False)
    ds.setdefault("steps_per_print", 10 ** 9)  # our logger prints; DeepSpeed's would sync and clutter
    return ds


class _TupleOutputM3AE(M3AE):
    """M3AE whose forward returns a tuple. ZeRO-3 re-gathers a module's parameters for backward through
    hooks on the tensors its forward returns, and DeepSpeed only finds tensors in tuples, lists and
    dicts, not in M3AE's dataclass output; without this the loss backward sees released (empty) weights."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return out.loss, out.image_loss, out.text_loss


class DeepSpeedRuntime:
    """DeepSpeed engine (ZeRO 1/2/3, offload). Needs the `deepspeed` package (extra: m3ae-engine[deepspeed])."""

    kind = "deepspeed"

    def __init__(self, model, cfg, info: DistInfo, device: torch.device):
        try:
            import deepspeed
        except ImportError as e:
            raise ConfigError("--deepspeed_config needs the deepspeed package: pip install deepspeed "
                              f"(import failed: {e})") from None
        self.cfg, self.info, self.device = cfg, info, device
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.ds_config = prepare_ds_config(cfg.deepspeed_config, cfg, info, device)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.zero_stage == 3 and getattr(model.config, "compile_blocks", False):
            # the compiled block reads its sub-modules' weights without calling them, and ZeRO-3 gathers
            # a module's partitioned weights only in that module's forward hooks
            raise ConfigError("compile_blocks is not supported with ZeRO-3; use ZeRO-1/2 or compile_blocks: false")
        model.__class__ = _TupleOutputM3AE  # same parameters and state_dict keys, tuple output
        model = model.to(device)
        groups = model.param_groups(cfg.weight_decay)
        optimizer = None
        if "optimizer" not in self.ds_config:  # client optimizer: torch AdamW, fused on CUDA
            optimizer = build_optimizer(model, cfg.peak_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                        fused=device.type == "cuda")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, config=copy.deepcopy(self.ds_config))
        self.module = self.engine.module
        if self.zero_stage == 3:
            # M3AE.forward hands the vocab head's last Linear (weight, bias) straight to the fused CE op
            # without calling the head module, so ZeRO-3 would never gather them; registering them makes
            # M3AE's own hooks fetch them. (The MLP head's earlier layers are called as modules.)
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter
            head = self.module.decoder_text_output
            for p in (head.weight, head.bias):
                register_external_parameter(self.module, p)
        half = next((k for k in ("bf16", "fp16") if self.ds_config.get(k, {}).get("enabled", False)), None)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if half == "bf16" else torch.float16)
                         if half else contextlib.nullcontext())

    def local_numel(self) -> int:
        """Parameter elements this rank stores: about 1/world of the model under ZeRO-3, all of it otherwise."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.module.parameters())

    def forward_backward(self, batch, noise, last_micro: bool, nan: bool = False):
        with self.autocast:  # DeepSpeed casts the weights; autocast keeps fp32 inputs and bf16 weights compatible
            out = forward_micro_batch(self.engine, batch, noise, self.device, self.cfg.unpaired_text_loss_weight)
        # the loop calls engine.step() once per optimizer step, after all micro-batches: tell DeepSpeed
        # which backward ends the accumulation (its own count assumes a step() call per micro-batch)
        self.engine.set_gradient_accumulation_boundary(last_micro)
        self.engine.backward(inject(out.loss, nan))  # DeepSpeed divides by gradient_accumulation_steps
        return out

    def step(self, lr: float, loss_bad: torch.Tensor):
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()  # ZeRO's overflow check discards a step with a non-finite gradient norm
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        bad = torch.tensor(not self.engine.was_step_applied())
        return norm, bad

    def save(self, path: Path, client_state: dict) -> None:
        self.engine.save_checkpoint(str(path), tag="deepspeed", client_state=client_state, save_latest=False)

    def load(self, path: Path) -> dict:
        from .checkpoint import CheckpointError, deepspeed_loads_weights_only
        with deepspeed_loads_weights_only():  # DeepSpeed's own torch.load calls: no code from the files
            _, client_state = self.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                          load_lr_scheduler_states=False)
        if client_state is None:
            raise CheckpointError(f"could not load the DeepSpeed checkpoint in {path} (files missing)")
        return client_state


def build_runtime(model, cfg, info: DistInfo, device: torch.device):
    cls = DeepSpeedRuntime if cfg.deepspeed_config else PlainRuntime
    return cls(model, cfg, info, device)
