"""TrainConfig: every knob of a training run in one dataclass, and train.py's parser.

Sources, later wins: the defaults below < a YAML/JSON file (`--config run.yaml`) < command-line flags.
Every M3AEConfig field the preset sets (image_size, patch_size, emb_dim, ...) is an option too: it goes
to `TrainConfig.model` and overrides the preset. The effective config is validated before any work
(ConfigError, one line naming the field and the allowed values), printed at start and saved as
`train_config.json` in the output dir and in every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .flags import (BoolFlag, ErrorParser, HelpFormatter, check_type, coerce, is_bool, join_negative_values, parser_for,
                    read_mapping, unknown_key_error)
from ..model.config import ENCODER_PRESETS, ConfigError, M3AEConfig
from .optim import scaled_lr

OFFICIAL_BASE_LR = 1.5e-4
TINY_BASE_LR = 1.5e-3  # 10x official: the tiny demo must visibly learn in 300 steps


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.75
    mask_sharing: str = "sample"  # "sample" (MAE) | "batch" (official M3AE: one permutation per rank)
    image_loss_weight: float = 1.0
    text_loss_weight: float = 0.5
    norm_pix_loss: bool = False
    image_all_token_loss: bool = False  # official flag: pixel loss over every patch
    text_all_token_loss: bool = False  # official flag: word loss over every non-padded token
    output_head_depth: int = 0  # official flag m3ae.output_head_depth: 0 = Linear heads, k = MLP heads
    kernels: str = "auto"  # auto | torch | triton | cuda
    attention: str = "auto"
    compile_blocks: bool = False  # torch.compile the attention-free halves of each block (not with ZeRO-3)
    # data
    data: str = "synthetic"  # "synthetic" or a WebDataset shard pattern (needs m3ae_engine.data.build_loader)
    modality: str = "paired"  # paired (M3AE) | image (MAE mode: image-only forwards; shards need no captions)
    unpaired_text_data: Optional[str] = None  # official unpaired text term: "synthetic" or text files / text shards
    unpaired_text_loss_weight: float = 0.0  # weight of the unpaired text-only forward's text loss (official flag)
    unpaired_image_data: Optional[str] = None  # image-only term: "synthetic" or image-only (or paired) shards
    unpaired_image_ratio: float = 0.0  # image-only samples per paired sample in each step (0 = off)
    paired_fraction: float = 1.0  # share of samples keeping their caption (official deterministic_drop_text = 1 - F)
    random_drop_text: float = 0.0  # each visit drops a caption with this probability (official random_drop_text)
    dataset_size: Optional[int] = None  # samples per epoch; needed for --epochs with endless synthetic data
    num_workers: int = 4
    # schedule; batch_size is GLOBAL (all ranks, all accumulation micro-steps)
    batch_size: int = 64
    grad_accum: int = 1
    steps: Optional[int] = 300
    epochs: Optional[float] = None  # alternative to steps: steps = ceil(epochs * dataset_size / batch_size)
    base_lr: Optional[float] = None  # None: 1.5e-4 official (1.5e-3 for the tiny preset); lr = base_lr*batch/256
    warmup_steps: Optional[int] = 20
    warmup_epochs: Optional[float] = None  # official: 5 epochs
    end_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # official code: none (1e9); 0 disables. DeepSpeed uses its config's gradient_clipping
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    # run
    seed: int = 0
    device: Optional[str] = None  # cpu | cuda (default: cuda if available)
    output_dir: Optional[str] = None  # metrics, checkpoints, final weights; None = write nothing (train.py's
    # default is runs/<preset>-<date>-<time>, see parse)
    resume: Optional[str] = None  # "latest" (newest in output_dir/checkpoints) or a checkpoint dir
    log_every: int = 25
    ckpt_every: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 3
    eval_every: int = 0  # 0: no eval; else held-out loss on eval_batches fixed synthetic batches
    eval_batches: int = 2
    max_bad_steps: int = 10  # this many non-finite steps in a row stop the run
    tensorboard: bool = True
    wandb_project: Optional[str] = None  # log to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
    wandb_name: Optional[str] = None  # the W&B run name (default: the output dir's name)
    deepspeed_config: Optional[str] = None  # set by --deepspeed_config; None = plain PyTorch / DDP
    model: dict = field(default_factory=dict)  # M3AEConfig fields over the preset's: {"image_size": 64, ...}

    def __post_init__(self):
        self.validate()

    # ---- derived ----
    @property
    def effective_base_lr(self) -> float:
        if self.base_lr is not None:
            return self.base_lr
        return TINY_BASE_LR if self.preset == "tiny" else OFFICIAL_BASE_LR

    @property
    def peak_lr(self) -> float:
        return scaled_lr(self.effective_base_lr, self.batch_size)

    @property
    def total_steps(self) -> int:
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * self.dataset_size / self.batch_size))
        return self.steps

    @property
    def unpaired_image_batch_size(self) -> int:
        """Image-only samples per optimizer step (all ranks and micro-steps)."""
        return int(round(self.unpaired_image_ratio * self.batch_size))

    @property
    def total_warmup_steps(self) -> int:
        if self.warmup_epochs is not None:
            return int(round(self.warmup_epochs * self.dataset_size / self.batch_size))
        return self.warmup_steps or 0

    def model_overrides(self) -> dict:
        """M3AEConfig fields over the preset's: the model options this dataclass names, then `model`."""
        return dict(image_mask_ratio=self.image_mask_ratio, text_mask_ratio=self.text_mask_ratio,
                    mask_sharing=self.mask_sharing, image_loss_weight=self.image_loss_weight,
                    text_loss_weight=self.text_loss_weight, norm_pix_loss=self.norm_pix_loss,
                    image_all_token_loss=self.image_all_token_loss, text_all_token_loss=self.text_all_token_loss,
                    output_head_depth=self.output_head_depth,
                    kernels=self.kernels, attention=self.attention, compile_blocks=self.compile_blocks,
                    **self.model)

    def model_config(self) -> M3AEConfig:
        return M3AEConfig.from_preset(self.preset, **self.model_overrides())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- validation: everything that can be checked before building anything ----
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        def pos_int(name, allow_zero=False):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v >= 1)
            need(ok, f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")

        for f in dataclasses.fields(self):  # basic types first: `steps: ten` is a one-line error, not a crash
            check_type(f.name, getattr(self, f.name), str(f.type))
        need(isinstance(self.model, dict), f"model must be a mapping of M3AEConfig fields, got {self.model!r}")
        model_types = model_field_types()
        for k, v in self.model.items():
            if k not in model_types:
                raise unknown_key_error(k, model_types, " in model")
            check_type(k, v, model_types[k])
        need(self.preset in ENCODER_PRESETS,
             f"preset must be one of {', '.join(ENCODER_PRESETS)}; got {self.preset!r}")
        for name in ("batch_size", "grad_accum", "log_every", "keep_last", "eval_batches", "max_bad_steps",
                     "num_workers"):
            pos_int(name, allow_zero=name == "num_workers")
        for name in ("ckpt_every", "eval_every"):
            pos_int(name, allow_zero=True)
        need(self.batch_size % self.grad_accum == 0,
             f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        need((self.steps is None) != (self.epochs is None),
             f"give exactly one of steps and epochs (got steps={self.steps!r}, epochs={self.epochs!r}); "
             f"on the command line --epochs replaces the default --steps")
        if self.steps is not None:
            pos_int("steps")
        if self.epochs is not None or self.warmup_epochs is not None:
            need(self.dataset_size is not None,
                 "epochs / warmup_epochs need dataset_size (samples per epoch) to convert to steps")
        if self.epochs is not None:
            need(isinstance(self.epochs, (int, float)) and self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        if self.dataset_size is not None:
            pos_int("dataset_size")
        need((self.warmup_steps is None) or (self.warmup_epochs is None),
             "give at most one of warmup_steps and warmup_epochs")
        if self.warmup_steps is not None:
            pos_int("warmup_steps", allow_zero=True)
        if self.warmup_epochs is not None:
            need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        need(self.base_lr is None or (isinstance(self.base_lr, (int, float)) and 0 < self.base_lr < 1),
             f"base_lr must be in (0, 1), got {self.base_lr!r}")
        need(self.end_lr >= 0, f"end_lr must be >= 0, got {self.end_lr!r}")
        need(0 <= self.weight_decay < 1, f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}")
        need(self.precision in ("auto", "bf16", "fp32"),
             f"precision must be auto, bf16 or fp32; got {self.precision!r}")
        need(self.device is None or self.device.split(":")[0] in ("cpu", "cuda"),
             f"device must be cpu or cuda[:N], got {self.device!r}")
        need(isinstance(self.data, str) and self.data != "", "data must be 'synthetic' or a shard pattern")
        need(self.modality in ("paired", "image"),
             f"modality must be paired (M3AE) or image (MAE: image-only), got {self.modality!r}")
        need(self.unpaired_text_loss_weight >= 0,
             f"unpaired_text_loss_weight must be >= 0, got {self.unpaired_text_loss_weight!r}")
        need((self.unpaired_text_data is None) == (self.unpaired_text_loss_weight == 0),
             "unpaired text needs both --unpaired-text-data and a positive --unpaired-text-loss-weight "
             f"(got data={self.unpaired_text_data!r}, weight={self.unpaired_text_loss_weight!r})")
        need(isinstance(self.unpaired_image_ratio, (int, float)) and self.unpaired_image_ratio >= 0,
             f"unpaired_image_ratio must be >= 0, got {self.unpaired_image_ratio!r}")
        need((self.unpaired_image_data is None) == (self.unpaired_image_ratio == 0),
             "unpaired images need both --unpaired-image-data and a positive --unpaired-image-ratio "
             f"(got data={self.unpaired_image_data!r}, ratio={self.unpaired_image_ratio!r})")
        if self.unpaired_image_data is not None:
            u = self.unpaired_image_ratio * self.batch_size
            need(abs(u - round(u)) < 1e-6 and round(u) % self.grad_accum == 0,
                 f"unpaired_image_ratio x batch_size = {u:g} image-only samples per step must be a whole "
                 f"number divisible by grad_accum ({self.grad_accum})")
            need(self.modality == "paired",
                 "--unpaired-image-data mixes image-only batches into M3AE (paired) training; in MAE mode "
                 "(--modality image) every forward is image-only already: add the shards to --data")
        for name in ("paired_fraction", "random_drop_text"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
                 f"{name} must be in [0, 1], got {v!r}")
        need(self.modality == "paired" or (self.paired_fraction == 1 and self.random_drop_text == 0),
             "paired_fraction / random_drop_text drop captions of paired data: not with --modality image")
        need(self.eval_every == 0 or self.data == "synthetic",
             "eval_every needs --data synthetic: the held-out eval reads synthetic batches (an eval split of "
             "WebDataset shards is not wired into the loop yet); set eval_every: 0")
        need(self.resume is None or self.output_dir is not None or self.resume != "latest",
             "--resume latest needs --output-dir (it looks in OUTPUT_DIR/checkpoints)")
        if self.resume not in (None, "latest"):
            need(Path(self.resume).is_dir(), f"--resume: checkpoint directory not found: {self.resume}")
        if self.wandb_project is not None:
            import importlib.util
            need(importlib.util.find_spec("wandb") is not None,
                 "--wandb-project needs the wandb package: pip install wandb")
        if self.deepspeed_config is not None:
            need(Path(self.deepspeed_config).is_file(), f"DeepSpeed config not found: {self.deepspeed_config}")
        # the model's own checks (sizes, mask ratios, sharing, weights, kernels) with its messages
        self.model_config()
        # warmup longer than the run is allowed: short test runs then stay in the linear ramp


HELP = {
    "preset": "model size: tiny | small | base | large | huge",
    "image_mask_ratio": "fraction of image patches masked (official 0.75)",
    "text_mask_ratio": "fraction of text positions masked (official 0.75)",
    "mask_sharing": "sample (one permutation per sample, MAE) | batch (one per rank, official M3AE)",
    "image_loss_weight": "weight of the pixel MSE term", "text_loss_weight": "weight of the word CE term (paper 0.5)",
    "norm_pix_loss": "true: MAE's per-patch normalised pixel target",
    "image_all_token_loss": "true: pixel loss over every patch, not only the masked ones (official flag)",
    "text_all_token_loss": "true: word loss over every non-padded token, not only the masked ones (official flag)",
    "output_head_depth": "0: one Linear per output head (official default); k: the official k-layer MLP heads",
    "kernels": "auto | torch | triton | cuda", "attention": "attention backend (auto picks the fastest)",
    "compile_blocks": "true: torch.compile the element-wise work of each block (LayerNorm, GELU, residuals); not with ZeRO-3",
    "data": "synthetic, or WebDataset shards 'dir/{00000..00099}.tar' (several joined with ::)",
    "modality": "paired (M3AE) | image (MAE mode: image-only forwards on image shards or synthetic images)",
    "unpaired_text_data": "unpaired text (official): synthetic, or text files / text shards; each step adds a text-only forward",
    "unpaired_text_loss_weight": "weight of the unpaired text loss (official flag; 0 = off)",
    "unpaired_image_data": "image-only data: synthetic, or image-only (or paired) shards; each step adds an "
                           "image-only forward weighted as the paired image loss",
    "unpaired_image_ratio": "image-only samples per paired sample in each step (R x batch_size of them; 0 = off)",
    "paired_fraction": "share of samples that keep their caption: index %% 100 < (1-F)*100 loses it "
                       "(official deterministic_drop_text = 1 - F; 1 = all paired)",
    "random_drop_text": "probability that a sample's caption is dropped at each visit (official random_drop_text)",
    "dataset_size": "samples per epoch (needed with --epochs / --warmup-epochs)",
    "batch_size": "GLOBAL batch: all ranks and accumulation steps together",
    "grad_accum": "micro-steps per optimizer step", "steps": "optimizer steps (or give --epochs)",
    "base_lr": "lr = base_lr * batch_size / 256 (default 1.5e-4; 1.5e-3 for tiny)",
    "warmup_steps": "linear warmup steps, then cosine to --end-lr", "warmup_epochs": "warmup in epochs (official 5)",
    "grad_clip": "max global grad norm (0 = off; DeepSpeed: its config's gradient_clipping)",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32 (plain PyTorch path)",
    "resume": "latest (newest complete checkpoint in OUTPUT_DIR/checkpoints) or a checkpoint dir",
    "log_every": "steps between logs (the only host syncs)", "ckpt_every": "steps between checkpoints (0: end only)",
    "keep_last": "checkpoints kept", "eval_every": "steps between held-out evals (0: off)",
    "max_bad_steps": "non-finite steps in a row that stop the run",
    "output_dir": "metrics.jsonl, tensorboard/, checkpoints/, model.safetensors go here (default: "
                  "runs/PRESET-DATE-TIME; 'none': write nothing)",
    "num_workers": "DataLoader workers of the shard loader (capped at the cores this process may use)",
    "tensorboard": "TensorBoard scalars in OUTPUT_DIR/tensorboard", "seed": "seed of init, data and masks",
    "device": "cpu | cuda[:N] (default: cuda if available)", "end_lr": "lr at the end of the cosine",
    "weight_decay": "AdamW weight decay (official 0.05)", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "eval_batches": "held-out batches per eval",
    "wandb_project": "log to this Weights & Biases project (needs `pip install wandb`; WANDB_MODE=offline "
                     "logs without a network)",
    "epochs": "alternative to --steps: passes over --dataset-size samples",
    "wandb_name": "W&B run name (default: the output folder's name)",
}

# --help sections. A field listed nowhere (a newly added one) appears under "other options".
GROUPS = {
    "model (the M3AEConfig fields below override the preset's)": (
        "preset", "image_mask_ratio", "text_mask_ratio", "mask_sharing", "image_loss_weight", "text_loss_weight",
        "norm_pix_loss", "image_all_token_loss", "text_all_token_loss", "output_head_depth", "kernels", "attention",
        "compile_blocks"),
    "data": ("data", "modality", "unpaired_text_data", "unpaired_text_loss_weight", "paired_fraction",
             "random_drop_text", "unpaired_image_data", "unpaired_image_ratio", "dataset_size", "num_workers"),
    "optimisation and schedule": ("batch_size", "grad_accum", "steps", "epochs", "base_lr", "warmup_steps",
                                  "warmup_epochs", "end_lr", "weight_decay", "beta1", "beta2", "grad_clip",
                                  "precision", "max_bad_steps", "seed"),
    "checkpointing and logging": ("output_dir", "resume", "log_every", "ckpt_every", "keep_last", "eval_every",
                                  "eval_batches", "tensorboard", "wandb_project", "wandb_name"),
    "device and distributed": ("device", "deepspeed_config"),
}
NOT_FLAGS = ("deepspeed_config", "model")  # --deepspeed_config is spelt DeepSpeed's way; model: one flag per field


def model_field_types() -> dict:
    """The M3AEConfig fields train.py exposes (name -> annotation): all but those TrainConfig names itself."""
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    return {f.name: str(f.type) for f in dataclasses.fields(M3AEConfig) if f.name not in own and f.name != "preset"}


def _model_help(name: str) -> str:
    default = {f.name: f.default for f in dataclasses.fields(M3AEConfig)}[name]
    by_preset = [f"{p} {v[name]}" for p, v in ENCODER_PRESETS.items() if name in v]
    return f"default {default!r}" + (f" ({', '.join(by_preset)})" if by_preset else "")


def default_output_dir(preset: str) -> str:
    """runs/<preset>-<UTC date>-<time>, with a -N suffix if that folder exists already."""
    base = f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    out, n = base, 1
    while Path(out).exists():
        n += 1
        out = f"{base}-{n}"
    return out


def load_file(path: str) -> dict:
    """A YAML or JSON mapping of TrainConfig / M3AEConfig field names (dashes or underscores; the model
    fields may also sit under a `model:` mapping). Unknown names get a "did you mean"."""
    raw = read_mapping(path)
    nested = raw.pop("model", None) or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{path}: model: expected a mapping of M3AEConfig fields, got {nested!r}")
    flat = {str(k).replace("-", "_"): v for k, v in {**raw, **nested}.items()}
    train_types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig) if f.name != "model"}
    model_types = model_field_types()
    out, model = {}, {}
    for k, v in flat.items():
        if k in train_types:
            out[k] = coerce(k, v, train_types[k])
        elif k in model_types:
            model[k] = coerce(k, v, model_types[k])
        else:
            raise unknown_key_error(k, set(train_types) | set(model_types), f" in {path}")
    if model:
        out["model"] = model
    return out


def build_parser() -> argparse.ArgumentParser:
    """Flags default to SUPPRESS so only the flags actually given override the file."""
    S = argparse.SUPPRESS
    p = ErrorParser(prog="train.py", usage="%(prog)s [--config FILE] [options]  (options by section below)",
                    description="Pretrain M3AE / MAE (see README: Training). Options also go in a YAML/JSON "
                                "file (--config); flags override it.",
                    argument_default=S, formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags override it)")
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    group_of = {name: groups[title] for title, names in GROUPS.items() for name in names}
    other = p.add_argument_group("other options")

    def add(group, name, type_name, help_text):
        flag = "--" + name.replace("_", "-")
        if is_bool(type_name):
            group.add_argument(flag, dest=name, action=BoolFlag, help=help_text)
        else:
            t = type_name.replace("Optional[", "").rstrip("]")
            metavar = {"int": "N", "float": "X"}.get(t, "R,G,B" if t.startswith("Tuple") else name.upper())
            group.add_argument(flag, dest=name, type=parser_for(type_name), metavar=metavar, help=help_text)

    for f in dataclasses.fields(TrainConfig):
        if f.name not in NOT_FLAGS:
            add(group_of.get(f.name, other), f.name, str(f.type), HELP.get(f.name, f"default {f.default!r}"))
    model_group = next(iter(groups.values()))
    for name, type_name in model_field_types().items():
        add(model_group, name, type_name, _model_help(name))
    dist_group = groups["device and distributed"]
    # the DeepSpeed launcher passes --local_rank; deepspeed's own flags name the config
    dist_group.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", metavar="JSON",
                            help="DeepSpeed JSON config: train with DeepSpeed (ZeRO) instead of plain PyTorch/DDP")
    dist_group.add_argument("--local_rank", "--local-rank", type=int, help=S)
    dist_group.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's launcher conventions")
    return p


def parse(argv=None) -> TrainConfig:
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((t for t in unknown if t.startswith("-")), None)
        if flag is None:
            raise ConfigError(f"unexpected argument {unknown[0]!r} (options are --name value)")
        known = [a.dest for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]
        raise unknown_key_error(flag.split("=")[0], known, " on the command line", flag=True)
    args = vars(args)
    values = load_file(args.pop("config")) if "config" in args else {}
    args.pop("local_rank", None)  # the launcher also sets LOCAL_RANK, which is what we read
    args.pop("deepspeed", None)
    model_types = model_field_types()
    flag_model = {k: args.pop(k) for k in list(args) if k in model_types}
    for source in (values, args):  # epochs (file or flag) replace the default step counts
        if "epochs" in source and "steps" not in source:
            values["steps"] = None
        if "warmup_epochs" in source and "warmup_steps" not in source:
            values["warmup_steps"] = None
    if "steps" in args and "epochs" not in args:  # a --steps flag overrides the file's epochs
        values["epochs"] = None
    if "warmup_steps" in args and "warmup_epochs" not in args:
        values["warmup_epochs"] = None
    values.update(args)
    if flag_model:
        values["model"] = {**values.get("model", {}), **flag_model}
    if values.get("deepspeed_config") is None and os.environ.get("M3AE_DEEPSPEED_CONFIG"):
        values["deepspeed_config"] = os.environ["M3AE_DEEPSPEED_CONFIG"]
    if isinstance(values.get("output_dir"), str) and values["output_dir"].lower() in ("none", "null", ""):
        values["output_dir"] = None  # explicitly: write nothing
    elif "output_dir" not in values and values.get("resume") != "latest":  # (--resume latest names its folder)
        values["output_dir"] = default_output_dir(values.get("preset", TrainConfig.preset))
    return TrainConfig(**values)


