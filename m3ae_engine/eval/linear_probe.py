"""Linear probe: frozen encoder, CLS feature, BatchNorm1d(affine=False, eps 1e-6) + Linear.

    python -m m3ae_engine.eval.linear_probe --checkpoint RUN_DIR --train DATA/train --val DATA/val \
        [--epochs 90 --optimizer lars --blr 0.1 --output-dir probe_out]

The encoder sees the full unmasked image (with the encoder image type embedding, as in pretraining);
its CLS features are computed once and cached (`OUTPUT_DIR/features_{train,val}.pt`, reused when the
checkpoint and the images are unchanged), then the head trains on the cached features. Recipe of the
official linear probe (MAE main_linprobe): LARS (momentum 0.9, trust 0.001, weight decay 0), lr = blr *
batch / 256, linear warmup then half-cycle cosine per step, head weight trunc_normal(0.01). Without
augmentation the features are fixed, which is what makes caching possible; the official recipe's
RandomResizedCrop on the train split is not reproduced. Top-1/top-5 are printed and written to
`OUTPUT_DIR/linear_probe.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..train.optim import scaled_lr, warmup_cosine
from .features import ImageFolder, add_model_args, cached_features, checkpoint_fingerprint, model_from_args


class LARS(torch.optim.Optimizer):
    """LARS as in facebookresearch/mae util/lars.py: weight decay and layer-wise adaptation only for
    parameters with more than one dimension (not biases / norm parameters)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm,
                                                one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def lr_at(epoch: float, lr: float, warmup_epochs: float, epochs: int, min_lr: float = 0.0) -> float:
    """MAE util/lr_sched.adjust_learning_rate: linear warmup, then half-cycle cosine (per step); the
    same schedule as pretraining, in epochs."""
    return warmup_cosine(epoch, epochs, warmup_epochs, lr, end_lr=min_lr)


def make_head(dim: int, num_classes: int) -> nn.Sequential:
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(1).float().mean().item()
        out[f"top{k}"] = 100.0 * hit
    return out


def train_linear_probe(train_x, train_y, val_x, val_y, num_classes: int, epochs: int = 90,
                       batch_size: int = 256, blr: float = 0.1, optimizer: str = "lars", weight_decay: float = 0.0,
                       momentum: float = 0.9, warmup_epochs: float = 10, min_lr: float = 0.0, seed: int = 0,
                       device="cpu", log_every: int = 0) -> dict:
    """Train BN + Linear on cached features; returns metrics and the head."""
    if train_x.ndim != 2 or train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"train features must be [N, D] with N labels, got {tuple(train_x.shape)} / "
                         f"{tuple(train_y.shape)}")
    if train_x.shape[0] < 2:
        raise ValueError("the linear probe needs at least 2 training images (BatchNorm statistics)")
    if int(train_y.min()) < 0 or int(train_y.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes})")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = make_head(train_x.shape[1], num_classes).to(device)
    batch_size = min(batch_size, train_x.shape[0])
    lr = scaled_lr(blr, batch_size)
    if optimizer == "lars":
        opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'lars' or 'sgd', got {optimizer!r}")
    n = train_x.shape[0]
    steps_per_epoch = max(1, n // batch_size)  # drop_last, as the official loader
    tx, ty = train_x.to(device), train_y.to(device)
    crit = nn.CrossEntropyLoss()
    loss = torch.zeros(())
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=g).to(device)
        for it in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch + it / steps_per_epoch, lr, warmup_epochs, epochs, min_lr)
            idx = perm[it * batch_size:(it + 1) * batch_size]
            loss = crit(head(tx[idx]), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if log_every and (epoch + 1) % log_every == 0:
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", file=sys.stderr)
    head.eval()
    with torch.no_grad():
        metrics = topk_accuracy(head(val_x.to(device)).cpu(), val_y)
        train_metrics = topk_accuracy(head(tx).cpu(), train_y)
    return {**metrics, "train_top1": train_metrics["top1"], "final_loss": float(loss.item()), "lr": lr,
            "head": head.cpu()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ae_engine.eval.linear_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--train", required=True, help="ImageFolder: TRAIN/CLASS/*.jpg")
    p.add_argument("--val", required=True, help="ImageFolder with the same class names")
    p.add_argument("--output-dir", default="linear_probe_out")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=256, help="head training batch (official: 16384)")
    p.add_argument("--blr", type=float, default=0.1, help="lr = blr * batch / 256")
    p.add_argument("--optimizer", choices=("lars", "sgd"), default="lars")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--crop-pct", type=float, default=0.875, help="resize to size/crop_pct, centre crop size")
    p.add_argument("--feature-batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="always recompute the features")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be >= 1")
    try:
        t0 = time.time()
        model, _, device = model_from_args(args)
        size = model.config.image_size
        train_ds = ImageFolder(args.train, size, args.crop_pct)
        val_ds = ImageFolder(args.val, size, args.crop_pct, classes=train_ds.classes)
        out = Path(args.output_dir)
        ck = checkpoint_fingerprint(args.checkpoint)
        common = dict(batch_size=args.feature_batch_size, num_workers=args.num_workers, use_cache=not args.no_cache)
        train_x, train_y = cached_features(model, train_ds, out / "features_train.pt", ck, **common)
        val_x, val_y = cached_features(model, val_ds, out / "features_val.pt", ck, **common)
        res = train_linear_probe(train_x, train_y, val_x, val_y, len(train_ds.classes), epochs=args.epochs,
                                 batch_size=args.batch_size, blr=args.blr, optimizer=args.optimizer,
                                 weight_decay=args.weight_decay, momentum=args.momentum,
                                 warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, seed=args.seed,
                                 device=device, log_every=max(1, args.epochs // 10))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    head = res.pop("head")
    result = {"top1": res["top1"], "top5": res["top5"], "train_top1": res["train_top1"],
              "final_loss": res["final_loss"], "num_classes": len(train_ds.classes), "classes": train_ds.classes,
              "num_train": len(train_ds), "num_val": len(val_ds), "feature_dim": int(train_x.shape[1]),
              "checkpoint": str(args.checkpoint), "epochs": args.epochs, "optimizer": args.optimizer,
              "batch_size": min(args.batch_size, len(train_ds)), "lr": res["lr"], "blr": args.blr,
              "seconds": round(time.time() - t0, 2)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_probe.json").write_text(json.dumps(result, indent=2))
    torch.save(head.state_dict(), str(out / "head.pt"))
    print(f"linear probe: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({len(train_ds)} train / {len(val_ds)} val images, {len(train_ds.classes)} classes) "
          f"-> {out / 'linear_probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
