"""Out-of-distribution score: Mahalanobis distance to class means (shared covariance) on CLS features.

    python -m m3ae_engine.eval.ood --checkpoint RUN_DIR --train IN/train --in IN/val --ood OOD_DIR [--ood OOD2]

Class means and one shared covariance are fitted on the labelled in-distribution training folder
(Lee et al. 2018); an image's score is its smallest Mahalanobis distance to a class mean (higher =
more out-of-distribution). AUROC separates the in-distribution test folder (negatives) from each OOD
folder (positives); OOD folders may be flat (no class sub-folders). Results go to OUTPUT_DIR/ood.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from .features import ImageFolder, add_model_args, cached_features, checkpoint_fingerprint, model_from_args


def fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-6
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """features [N, D], labels [N] -> (class means [C, D], precision [D, D]) in float64.
    The shared covariance is the pooled within-class covariance; a ridge keeps it invertible."""
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"need features [N, D] and labels [N], got {tuple(features.shape)} / {tuple(labels.shape)}")
    x = features.double()
    classes = torch.unique(labels)
    if (classes < 0).any():
        raise ValueError("fitting needs labelled in-distribution features (labels >= 0)")
    means = torch.stack([x[labels == c].mean(0) for c in classes])  # [C, D]
    centred = x - means[torch.searchsorted(classes, labels)]
    cov = centred.T @ centred / x.shape[0]
    scale = cov.diagonal().mean().clamp_min(1e-12)
    precision = torch.linalg.pinv(cov + ridge * scale * torch.eye(cov.shape[0], dtype=cov.dtype), hermitian=True)
    return means, precision


def mahalanobis_score(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """[N] min over classes of (x - mu_c)^T P (x - mu_c); higher = further from every class."""
    diff = features.double()[:, None, :] - means[None]  # [N, C, D]
    d = torch.einsum("ncd,de,nce->nc", diff, precision, diff)
    return d.min(1).values


def auroc(scores_negative, scores_positive) -> float:
    """Rank-based AUROC (Mann-Whitney U) with average ranks for ties: P(score_pos > score_neg)
    + 0.5 P(equal). Positives are the OOD samples."""
    neg = np.asarray(scores_negative, dtype=np.float64).reshape(-1)
    pos = np.asarray(scores_positive, dtype=np.float64).reshape(-1)
    if neg.size == 0 or pos.size == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD score")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("AUROC scores must be finite")
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    ranks = np.empty(allv.size, dtype=np.float64)
    i = 0
    while i < allv.size:  # average rank over each run of ties (ranks start at 1)
        j = i
        while j + 1 < allv.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    r_pos = ranks[neg.size:].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ae_engine.eval.ood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--train", required=True, help="labelled in-distribution ImageFolder (fits means/covariance)")
    p.add_argument("--in", dest="in_dist", required=True, help="in-distribution test images (folder)")
    p.add_argument("--ood", action="append", required=True, help="out-of-distribution folder (repeatable)")
    p.add_argument("--output-dir", default="ood_out")
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--feature-batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args(argv)
    try:
        model, _, _ = model_from_args(args)
        size = model.config.image_size
        out = Path(args.output_dir)
        ck = checkpoint_fingerprint(args.checkpoint)
        common = dict(batch_size=args.feature_batch_size, num_workers=args.num_workers, use_cache=not args.no_cache)
        train_ds = ImageFolder(args.train, size, args.crop_pct)
        tx, ty = cached_features(model, train_ds, out / "features_train.pt", ck, **common)
        means, prec = fit_mahalanobis(tx, ty)
        in_ds = ImageFolder(args.in_dist, size, args.crop_pct, allow_flat=True)
        in_scores = mahalanobis_score(cached_features(model, in_ds, out / "features_in.pt", ck, **common)[0],
                                      means, prec)
        results = {"checkpoint": str(args.checkpoint), "score": "min Mahalanobis distance to class means "
                   "(shared covariance), CLS features", "num_train": len(train_ds), "num_in": len(in_ds),
                   "in_score_mean": float(in_scores.mean()), "ood": {}}
        for i, folder in enumerate(args.ood):
            ds = ImageFolder(folder, size, args.crop_pct, allow_flat=True)
            s = mahalanobis_score(cached_features(model, ds, out / f"features_ood{i}.pt", ck, **common)[0],
                                  means, prec)
            a = auroc(in_scores.numpy(), s.numpy())
            results["ood"][str(folder)] = {"auroc": a, "num": len(ds), "score_mean": float(s.mean())}
            print(f"OOD {folder}: AUROC {100 * a:.2f}%  ({len(in_ds)} in / {len(ds)} ood images)")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood.json").write_text(json.dumps(results, indent=2))
    print(f"-> {out / 'ood.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
