"""Shared pieces of the evaluation commands: ImageFolder reading, checkpoint loading, frozen CLS
features with an on-disk cache.

Images are resized (shorter side to image_size / crop_pct, bicubic) and centre-cropped to the model's
`config.image_size`, kept as uint8: the model normalises with `config.image_mean/std` itself.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..interop.load import load_model  # noqa: F401  (re-exported for the eval commands)
from ..interop.report import ConversionError  # noqa: F401  (re-exported for the eval commands)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


def load_image(path, image_size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """File -> uint8 [3, S, S]: resize the shorter side to round(S / crop_pct), centre crop S."""
    from PIL import Image
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            short = int(round(image_size / crop_pct))
            scale = short / min(w, h)
            nw, nh = max(image_size, int(round(w * scale))), max(image_size, int(round(h * scale)))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


class ImageFolder(torch.utils.data.Dataset):
    """ROOT/CLASS/*.jpg, labels by sorted class name (or by the given `classes`, e.g. the train split's).
    With `allow_flat=True` a folder of images without class sub-folders is one unlabelled class (label -1)."""

    def __init__(self, root, image_size: int, crop_pct: float = 0.875, classes: Optional[Sequence[str]] = None,
                 allow_flat: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root, self.image_size, self.crop_pct = root, image_size, crop_pct
        dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.samples: List[Tuple[Path, int]] = []
        if dirs:
            self.classes = list(classes) if classes is not None else dirs
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted(set(dirs) - set(index))
            if unknown:
                raise ValueError(f"{root}: classes {unknown} are not among the training classes {self.classes}")
            for c in dirs:
                files = sorted(p for p in (root / c).rglob("*") if _is_image(p))
                self.samples += [(p, index[c]) for p in files]
        elif allow_flat:
            self.classes = []
            self.samples = [(p, -1) for p in sorted(root.rglob("*")) if _is_image(p)]
        else:
            raise ValueError(f"{root} has no class sub-folders (expected ROOT/CLASS/image.jpg)")
        if not self.samples:
            raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return load_image(path, self.image_size, self.crop_pct), label

    def fingerprint(self) -> str:
        """Changes when files, their sizes, times or labels change."""
        h = hashlib.sha1()
        for p, y in self.samples:
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}|{y}\n".encode())
        return h.hexdigest()


def checkpoint_fingerprint(path) -> str:
    path = Path(path)
    if path.is_dir():  # the weights and the config only (an output dir may also hold caches and logs)
        files = sorted(p for p in path.iterdir() if p.is_file() and (p.name.startswith("model.")
                                                                    or p.name == "config.json"))
    else:
        files = [path] + ([path.parent / "config.json"] if (path.parent / "config.json").is_file() else [])
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def pick_device(name: Optional[str]) -> torch.device:
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def extract_features(model, dataset, batch_size: int = 64, device=None, num_workers: int = 0,
                     verbose: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Frozen encoder on the full unmasked image (image type embedding included): CLS features
    float32 [N, D] (CPU) and labels int64 [N]."""
    device = device or next(model.parameters()).device
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
                else torch.autocast("cpu", enabled=False))
    for i, (img, y) in enumerate(loader):
        with autocast:
            cls = model.forward_representation(img.to(device, non_blocking=True))[:, 0]
        feats.append(cls.float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.int64))
        if verbose:
            print(f"  features {min((i + 1) * batch_size, len(dataset))}/{len(dataset)}", file=sys.stderr)
    return torch.cat(feats), torch.cat(labels)


def cached_features(model, dataset: ImageFolder, cache_path, checkpoint_id: str, batch_size: int = 64,
                    num_workers: int = 0, use_cache: bool = True, verbose: bool = True
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """extract_features with a cache file; reused only when checkpoint, files and preprocessing match."""
    key = json.dumps({"checkpoint": checkpoint_id, "files": dataset.fingerprint(), "image_size": dataset.image_size,
                      "crop_pct": dataset.crop_pct, "classes": dataset.classes}, sort_keys=True)
    cache_path = Path(cache_path) if cache_path else None
    if use_cache and cache_path is not None and cache_path.is_file():
        try:
            blob = torch.load(str(cache_path), map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                if verbose:
                    print(f"reusing cached features {cache_path}", file=sys.stderr)
                return blob["features"], blob["labels"]
            if verbose:
                print(f"cache {cache_path} is stale (checkpoint or images changed): recomputing", file=sys.stderr)
        except Exception as e:  # a corrupt cache is recomputed, never trusted
            print(f"cache {cache_path} unreadable ({e}): recomputing", file=sys.stderr)
    feats, labels = extract_features(model, dataset, batch_size, num_workers=num_workers)
    if cache_path is not None and use_cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "features": feats, "labels": labels}, str(cache_path))
    return feats, labels


def add_model_args(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="directory with model.safetensors + config.json, a .safetensors/.pt file, an official "
                        ".pkl or an MAE .pth")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--image-size", type=int, default=None, help="override (official pickles: default 256)")
    p.add_argument("--num-heads", type=int, default=None, help="override for non-preset widths")


def model_from_args(args):
    device = pick_device(args.device)
    overrides = {k: v for k, v in (("image_size", args.image_size), ("num_heads", args.num_heads)) if v is not None}
    model, report = load_model(args.checkpoint, device=device, **overrides)
    if report.not_converted or report.notes:
        print(report, file=sys.stderr)
    return model, report, device
