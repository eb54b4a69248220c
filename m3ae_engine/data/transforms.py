"""Image transforms shared by the Pillow (CPU) and nvJPEG (GPU) loaders.

RandomResizedCrop(S, scale 0.2-1.0, ratio 3/4-4/3, bicubic) + horizontal flip, with torchvision's
crop-sampling algorithm; the crop box and flip come from a numpy Generator seeded per sample, so the
CPU and GPU paths make the same choices. `random_crop=False` takes the centred largest square
instead (evaluation, and the CPU/GPU comparison).
"""
from __future__ import annotations

import io
import math
from typing import Sequence, Tuple

import numpy as np
import torch


SCALE = (0.2, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def crop_box(rng: np.random.Generator, height: int, width: int, scale=SCALE, ratio=RATIO,
             random_crop: bool = True) -> Tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision.transforms.RandomResizedCrop.get_params picks it."""
    if not random_crop:
        s = min(height, width)
        return (height - s) // 2, (width - s) // 2, s, s
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(seed: int, epoch: int, index: int, height: int, width: int, scale=SCALE, ratio=RATIO,
                  random_crop: bool = True, flip: bool = True):
    """Crop box and flip of one sample, a function of (seed, epoch, sample index) only: rank- and
    worker-independent, so a resumed or re-sharded run makes the same choices."""
    rng = np.random.default_rng([seed, 7, epoch, index])
    box = crop_box(rng, height, width, scale, ratio, random_crop)
    do_flip = bool(flip and rng.random() < 0.5)
    return box, do_flip


class TruncatedJPEG(ValueError):
    """A JPEG without its end-of-image marker after the last scan."""


def jpeg_complete(data: bytes) -> bool:
    """The rule every loader (Pillow, nvJPEG, DALI) and `validate` apply before decoding a JPEG: it must
    have an end-of-image marker (FF D9) after its last start-of-scan (FF DA). libjpeg-turbo decodes a
    truncated file without an error, filling the missing rows with grey; this catches it whatever the
    decoder or Pillow's LOAD_TRUNCATED_IMAGES say. (Neither marker can occur inside entropy-coded data,
    where FF is stuffed; an EXIF thumbnail's EOI comes before the main image's scans.) Non-JPEG data
    passes: its decoder checks it."""
    if not is_jpeg(data):
        return True
    # = rfind(EOI) > rfind(SOS) >= 0, reading only the tail after the last EOI and the header up to the first
    # SOS instead of the whole entropy-coded body (DALI checks every image of every batch on the host)
    eoi = data.rfind(b"\xff\xd9")
    return eoi >= 0 and data.find(b"\xff\xda", eoi) < 0 and 0 <= data.find(b"\xff\xda", 0, eoi)


def check_jpeg_complete(data: bytes) -> None:
    if not jpeg_complete(data):
        raise TruncatedJPEG("truncated JPEG: no end-of-image marker after the last scan")


def decode_pil(data: bytes):
    """Pillow decode to RGB (grey-scale, CMYK, palette, alpha all converted); raises on corrupt data,
    truncated JPEGs included (jpeg_complete)."""
    from PIL import Image
    check_jpeg_complete(data)
    img = Image.open(io.BytesIO(data))
    img.load()  # full decode now: truncated / corrupt data raises here
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def augment_pil(img, size: int, box, do_flip: bool) -> np.ndarray:
    """Crop `box` (top, left, h, w) resized to size x size (Pillow bicubic, antialiased), flipped -> uint8 [3,S,S]."""
    from PIL import Image
    i, j, h, w = box
    out = img.resize((size, size), Image.BICUBIC, box=(j, i, j + w, i + h))
    if do_flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def augment_gpu(images: Sequence[torch.Tensor], size: int, boxes, flips) -> torch.Tensor:
    """Decoded uint8 [3,H,W] tensors (any device) -> uint8 [B,3,S,S]: crop, bicubic antialiased resize
    (PIL-compatible), flip, all as torch ops on the images' device."""
    import torch.nn.functional as F
    out = []
    for img, (i, j, h, w), fl in zip(images, boxes, flips):
        x = img[:, i:i + h, j:j + w].unsqueeze(0).float()
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        if fl:
            x = x.flip(-1)
        out.append(x)
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def is_jpeg(data: bytes) -> bool:
    return len(data) > 3 and data[:3] == b"\xff\xd8\xff"


def jpeg_components(data: bytes):
    """Colour components of a baseline/progressive JPEG from its SOF header (1 grey, 3 YCbCr, 4 CMYK/YCCK),
    None when no frame header is found (not a JPEG, or corrupt). Header parsing only, no decoding."""
    if not is_jpeg(data):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = (data[i + 2] << 8) | data[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[i + 9] if i + 9 < n else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + seg
    return None
