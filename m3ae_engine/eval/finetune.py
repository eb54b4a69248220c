"""End-to-end fine-tuning of the encoder for image classification (the paper's transfer protocol).

    python -m m3ae_engine.eval.finetune --checkpoint RUN_DIR --train DATA/train --val DATA/val \
        --output-dir ft_out [--recipe m3ae|mae] [--epochs N --batch-size B --blr LR ...] [--resume]
    torchrun --nproc_per_node 8 -m m3ae_engine.eval.finetune ...      # DDP (NCCL on GPUs, gloo on CPUs)

The encoder becomes a timm VisionTransformer (`vit_classifier.py`, drop path from timm); timm also
supplies RandAugment and random erasing (create_transform), Mixup/CutMix and the soft-target /
label-smoothing losses. The layer-decay groups are timm's construction with each reference's layer ids
(timm's own put the final norm with the last block, as neither reference does). Two recipes set the defaults; every flag overrides its recipe value:

  m3ae  young-geng/m3ae_public finetune_main.py + data.py (transform_type "finetune"): 90 epochs,
        lr_peak 1.5e-4 x batch / 256, 5 warmup epochs, cosine to 0, AdamW (0.9, 0.999), weight decay 0,
        layer decay 0.75 (official layer ids), mixup 0.8 / cutmix 1.0 / switch 0.5, label smoothing 0.1, drop path 0,
        RandAugment rand-m9-mstd0.5-inc1, no random erasing, CLS token -> LayerNorm -> Linear head,
        val: resize to the image size, centre crop.
  mae   facebookresearch/mae main_finetune.py defaults + its fine-tuning recipe flags: 50 epochs,
        blr 1e-3, min lr 1e-6, weight decay 0.05, drop path 0.1, random erasing 0.25 (pixel mode),
        global average pool + fc_norm, val: resize to size / 0.875, centre crop; the rest as m3ae.
        (MAE's README lowers blr / layer decay for ViT-B: pass --blr 5e-4 --layer-decay 0.65 --epochs 100.)

lr = blr x (batch per rank x ranks) / 256, linear warmup then half-cycle cosine per step, each
parameter group scaled by its lr_scale. Images are normalised with ImageNet statistics (what both
references use on ImageNet) or, with --normalization checkpoint, the pretraining statistics.

Every epoch: top-1 / top-5 / loss on the whole val set (shared over ranks, no padding), then
OUTPUT_DIR/checkpoint.pt (model, optimizer, epoch, history; atomic) and OUTPUT_DIR/finetune.json (the
history). Each epoch's randomness (sampler order, augmentation, mixup, drop path) is seeded from
(seed, epoch, rank), so `--resume` continues exactly as if the run had not stopped. At the end
OUTPUT_DIR/classifier.safetensors holds the fine-tuned timm weights (timm kwargs and classes in its
metadata).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..storage.atomic import atomic_write_stream, atomic_write_text
from ..train.optim import scaled_lr, warmup_cosine
from .features import ImageFolder, load_model
from .linear_probe import topk_accuracy
from .vit_classifier import build_classifier, import_timm, layer_decay_groups

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"

RECIPES = {
    "m3ae": dict(epochs=90, blr=1.5e-4, min_lr=0.0, warmup_epochs=5.0, weight_decay=0.0, layer_decay=0.75,
                 drop_path=0.0, mixup=0.8, cutmix=1.0, switch_prob=0.5, smoothing=0.1, aa=RAND_AUGMENT,
                 color_jitter=1.0, reprob=0.0, pool="cls", head="m3ae", layer_ids="m3ae", crop_pct=1.0),
    "mae": dict(epochs=50, blr=1e-3, min_lr=1e-6, warmup_epochs=5.0, weight_decay=0.05, layer_decay=0.75,
                drop_path=0.1, mixup=0.8, cutmix=1.0, switch_prob=0.5, smoothing=0.1, aa=RAND_AUGMENT,
                color_jitter=None, reprob=0.25, pool="avg", head="mae", layer_ids="mae", crop_pct=0.875),
}
CHECKPOINT = "checkpoint.pt"
# settings a resumed run must share with the checkpoint (anything else changes the trajectory)
RESUME_KEYS = ("recipe", "epochs", "blr", "min_lr", "warmup_epochs", "weight_decay", "layer_decay", "drop_path",
               "mixup", "cutmix", "switch_prob", "smoothing", "aa", "color_jitter", "reprob", "pool", "head",
               "layer_ids", "crop_pct", "batch_size", "world_size", "seed", "normalization", "clip_grad", "classes",
               "model_config")


# ------------------------------------------------------------------------------------------- files
def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


# -------------------------------------------------------------------------------------------- data
class TransformedFolder(torch.utils.data.Dataset):
    """The samples of an ImageFolder (class checks included) through a torchvision/timm transform."""

    def __init__(self, folder: ImageFolder, transform):
        self.folder, self.transform = folder, transform

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.folder.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        return self.transform(im), label


def posterize_keep_bits(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits kept giving the black image it gave before Pillow 13 (and in the
    TF RandAugment reference), where Pillow >= 13 raises "bits must be between or equal to 1 and 8"."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> None:
    """RandAugment's posterize-increasing op reaches 0 bits at magnitude 10 (m9 + mstd0.5 gets there)."""
    from timm.data import auto_augment
    original = auto_augment.posterize
    if original is posterize_keep_bits:
        return
    auto_augment.posterize = posterize_keep_bits
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is original:
            auto_augment.NAME_TO_OP[name] = posterize_keep_bits


def build_transforms(cfg: dict, image_size: int, mean, std):
    """(train, val) transforms: timm's create_transform, as both reference recipes call it."""
    from timm.data import create_transform
    patch_timm_posterize()
    train = create_transform(input_size=image_size, is_training=True, color_jitter=cfg["color_jitter"],
                             auto_augment=cfg["aa"] or None, interpolation="bicubic", re_prob=cfg["reprob"],
                             re_mode="pixel", re_count=1, mean=mean, std=std)
    val = create_transform(input_size=image_size, is_training=False, interpolation="bicubic",
                           crop_pct=cfg["crop_pct"], mean=mean, std=std)
    return train, val


# --------------------------------------------------------------------------------------- distributed
def init_distributed(device_name: Optional[str]):
    """(rank, world, device) from torchrun's environment (the trainer's rules: runtime.dist_from_env /
    pick_device); NCCL on GPUs, gloo on CPUs."""
    from ..train.runtime import dist_from_env, pick_device
    info = dist_from_env()
    device = pick_device(device_name, info)
    if info.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info.rank, info.world_size, device


def all_sum(values, device) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every generator the epoch draws from (python: RandAugment, numpy: Mixup, torch: crops, drop path,
    loader worker seeds) starts from (seed, epoch, rank): a resumed epoch repeats exactly."""
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ------------------------------------------------------------------------------------------- loops
def lr_at(epoch_float: float, cfg: dict, peak_lr: float) -> float:
    """MAE util/lr_sched (= optax.warmup_cosine_decay_schedule from 0): linear warmup, half-cycle cosine."""
    return warmup_cosine(epoch_float, cfg["epochs"], cfg["warmup_epochs"], peak_lr, end_lr=cfg["min_lr"])


def make_criterion(cfg: dict):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        return SoftTargetCrossEntropy()  # smoothing is applied by Mixup to the targets
    if cfg["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    return torch.nn.CrossEntropyLoss()


def make_mixup(cfg: dict, num_classes: int):
    from timm.data import Mixup
    if cfg["mixup"] <= 0 and cfg["cutmix"] <= 0:
        return None
    return Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=1.0, switch_prob=cfg["switch_prob"],
                 mode="batch", label_smoothing=cfg["smoothing"], num_classes=num_classes)


def train_one_epoch(model, loader, optimizer, criterion, mixup, cfg, epoch, peak_lr, device, autocast) -> dict:
    model.train()
    steps = len(loader)
    loss_sum, n = 0.0, 0
    for it, (x, y) in enumerate(loader):
        lr = lr_at(epoch + it / steps, cfg, peak_lr)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with autocast:
            loss = criterion(model(x), y)
        loss_value = loss.item()  # the step's one host sync (MAE's loop: loss.item() + math.isfinite)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch} step {it}: lower --blr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
        optimizer.step()
        loss_sum += loss_value
        n += 1
    total, count = all_sum([loss_sum, n], device)
    return {"train_loss": total / max(count, 1), "lr": lr}


@torch.no_grad()
def evaluate(model, dataset, batch_size, device, autocast, rank=0, world=1, num_workers=0) -> dict:
    """top-1 / top-5 / cross-entropy over the whole dataset, each rank taking every world-th sample."""
    model.eval()
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    sums = [0.0, 0.0, 0.0, 0.0]  # top1 hits, top5 hits, loss sum, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x).float()
        acc = topk_accuracy(logits, y)
        sums[0] += acc["top1"] / 100 * len(y)
        sums[1] += acc["top5"] / 100 * len(y)
        sums[2] += F.cross_entropy(logits, y, reduction="sum").item()
        sums[3] += len(y)
    top1, top5, loss, count = all_sum(sums, device)
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "val_loss": loss / count}


# ----------------------------------------------------------------------------------------- command
def resolve_config(args) -> dict:
    cfg = dict(RECIPES[args.recipe])
    for k in cfg:
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    if isinstance(cfg["aa"], str) and cfg["aa"].lower() in ("", "none"):
        cfg["aa"] = None
    cfg.update(recipe=args.recipe, batch_size=args.batch_size, seed=args.seed, normalization=args.normalization,
               clip_grad=args.clip_grad)
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or (args.stop_after is not None and args.stop_after < 1):
        raise ValueError("--epochs, --batch-size and --stop-after must be >= 1")
    if cfg["warmup_epochs"] < 0:
        raise ValueError(f"--warmup-epochs must be >= 0, got {cfg['warmup_epochs']}")
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise ValueError(f"Mixup/CutMix pair the samples of a batch: --batch-size must be even, got {cfg['batch_size']}")
    return cfg


def load_resume(path: Path, setup: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, never run code from it
        raise ValueError(f"{path}: not a readable fine-tuning checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "setup"} <= set(state):
        raise ValueError(f"{path}: not a fine-tuning checkpoint of this command")
    differ = [k for k in RESUME_KEYS if state["setup"].get(k) != setup.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {state['setup'].get(k)!r} -> {setup.get(k)!r}" for k in differ[:4])
        raise ValueError(f"--resume: {path} was written with other settings ({shown}); "
                         f"rerun with the same flags or use another --output-dir")
    return state


def run(args) -> dict:
    rank, world, device = init_distributed(args.device)
    cfg = resolve_config(args)
    out = Path(args.output_dir)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not args.resume:
        raise ValueError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --output-dir")
    encoder, _ = load_model(args.checkpoint)
    mconf = encoder.config
    train_folder = ImageFolder(args.train, mconf.image_size)
    val_folder = ImageFolder(args.val, mconf.image_size, classes=train_folder.classes)
    num_classes = len(train_folder.classes)
    global_batch = cfg["batch_size"] * world
    if len(train_folder) // global_batch < 1:
        raise ValueError(f"{args.train} has {len(train_folder)} images, fewer than one global batch "
                         f"({cfg['batch_size']} x {world} ranks): lower --batch-size")
    setup = {**cfg, "world_size": world, "classes": train_folder.classes, "model_config": mconf.to_dict()}
    state = None
    if args.resume and ckpt_path.exists():
        state = load_resume(ckpt_path, setup)
    import_timm()  # after the input checks, so a user's mistake is reported first

    torch.manual_seed(args.seed)  # head init: the same on every rank
    vit, vit_kw = build_classifier(encoder.state_dict(), mconf, num_classes, cfg["pool"], cfg["head"],
                                   cfg["drop_path"])
    del encoder
    vit.to(device)
    peak_lr = scaled_lr(cfg["blr"], global_batch)
    optimizer = torch.optim.AdamW(layer_decay_groups(vit, cfg["weight_decay"], cfg["layer_decay"],
                                                     cfg["layer_ids"]), lr=peak_lr,
                                  betas=(0.9, 0.999))
    start_epoch, history = 0, []
    if state is not None:
        vit.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
    model = vit
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(vit, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg["normalization"] == "imagenet" else (mconf.image_mean,
                                                                                          mconf.image_std)
    train_tf, val_tf = build_transforms(cfg, mconf.image_size, mean, std)
    train_ds, val_ds = TransformedFolder(train_folder, train_tf), TransformedFolder(val_folder, val_tf)
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg["batch_size"], sampler=sampler,
                                         num_workers=args.num_workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    criterion, mixup = make_criterion(cfg), make_mixup(cfg, num_classes)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.precision == "bf16"
                else torch.autocast(device.type, enabled=False))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"fine-tuning {args.checkpoint}: {len(train_ds)} train / {len(val_ds)} val images, {num_classes} classes, "
        f"recipe {cfg['recipe']}, {world} rank(s) x batch {cfg['batch_size']}, lr {peak_lr:.3g}"
        + (f", resuming at epoch {start_epoch}" if start_epoch else ""), file=sys.stderr)

    t0 = time.time()
    end_epoch = cfg["epochs"] if args.stop_after is None else min(cfg["epochs"], start_epoch + args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        seed_epoch(args.seed, epoch, rank)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, criterion, mixup, cfg, epoch, peak_lr, device, autocast)
        stats.update(evaluate(vit, val_ds, args.eval_batch_size or cfg["batch_size"], device, autocast, rank, world,
                              args.num_workers))
        history.append({"epoch": epoch + 1, **stats})
        say(f"epoch {epoch + 1}/{cfg['epochs']}  train loss {stats['train_loss']:.4f}  val top-1 "
            f"{stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  val loss {stats['val_loss']:.4f}", file=sys.stderr)
        if rank == 0:
            payload = {"model": vit.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                       "history": history, "setup": setup}
            atomic_write_stream(ckpt_path, lambda f: torch.save(payload, f))
            write_json(out / "finetune.json", summary(args, cfg, history, peak_lr, len(train_ds), len(val_ds),
                                                      train_folder.classes, time.time() - t0))
        if world > 1:
            torch.distributed.barrier()
    result = summary(args, cfg, history, peak_lr, len(train_ds), len(val_ds), train_folder.classes, time.time() - t0)
    if rank == 0 and len(history) == cfg["epochs"]:  # the final classifier, once every epoch is done
        from safetensors.torch import save
        meta = {"timm_kwargs": json.dumps(vit_kw), "head": cfg["head"], "classes": json.dumps(train_folder.classes),
                "mean": json.dumps(list(mean)), "std": json.dumps(list(std)), "format": "pt"}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in vit.state_dict().items()}
        atomic_write_stream(out / "classifier.safetensors", lambda f: f.write(save(tensors, metadata=meta)))
        write_json(out / "finetune.json", result)
    return result


def summary(args, cfg, history, peak_lr, n_train, n_val, classes, seconds) -> dict:
    last = history[-1] if history else {}
    return {"top1": last.get("top1"), "top5": last.get("top5"),
            "best_top1": max((h["top1"] for h in history), default=None), "epochs_done": len(history),
            "history": history, "lr": peak_lr, "num_train": n_train, "num_val": n_val, "classes": classes,
            "checkpoint": str(args.checkpoint), "settings": cfg, "seconds": round(seconds, 2)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m3ae_engine.eval.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory with model.safetensors + config.json, a "
                   ".safetensors/.pt file, an official .pkl or an MAE .pth")
    p.add_argument("--train", required=True, help="ImageFolder: TRAIN/CLASS/*.jpg")
    p.add_argument("--val", required=True, help="ImageFolder whose classes are among the train classes")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="m3ae", help="defaults of the official M3AE "
                   "finetune_main (m3ae) or of MAE main_finetune (mae)")
    p.add_argument("--resume", action="store_true", help="continue OUTPUT_DIR/checkpoint.pt (if there is one)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help="leave after N epochs of this run "
                   "(a job with a time limit); continue later with --resume")
    p.add_argument("--batch-size", type=int, default=64, help="per rank; lr scales with batch x ranks")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--blr", type=float, default=None, help="lr = blr x global batch / 256")
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--layer-decay", type=float, default=None)
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--mixup", type=float, default=None, help="mixup alpha (0 disables)")
    p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (0 disables)")
    p.add_argument("--switch-prob", type=float, default=None, help="probability of cutmix when both are on")
    p.add_argument("--smoothing", type=float, default=None, help="label smoothing")
    p.add_argument("--aa", default=None, help="timm auto-augment policy, 'none' to disable")
    p.add_argument("--color-jitter", type=float, default=None, help="used by timm only without --aa")
    p.add_argument("--reprob", type=float, default=None, help="random erasing probability")
    p.add_argument("--pool", choices=("cls", "avg"), default=None)
    p.add_argument("--head", choices=("m3ae", "mae"), default=None, help="layout after the blocks "
                   "(see vit_classifier.py)")
    p.add_argument("--layer-ids", choices=("m3ae", "mae"), default=None, help="which reference assigns "
                   "parameters to layers for the layer decay (see vit_classifier.layer_id)")
    p.add_argument("--crop-pct", type=float, default=None, help="val: resize to size / crop_pct, centre crop")
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--normalization", choices=("imagenet", "checkpoint"), default="imagenet")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on CUDA")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except (FileNotFoundError, ValueError, ImportError, FloatingPointError) as e:
        # a DataLoader worker's error arrives wrapped with its traceback: its last line is "Type: message"
        msg = str(e).strip().splitlines()[-1]
        if msg.startswith(f"{type(e).__name__}: "):
            msg = msg[len(type(e).__name__) + 2:]
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(f"fine-tuning: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}% (best top-1 {res['best_top1']:.2f}%) "
          f"after {res['epochs_done']} epochs -> {Path(args.output_dir) / 'finetune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
