"""Real-JPEG WebDataset shards made on the fly (tests, benchmarks): synthetic scenes with their captions,
at varied sizes and aspect ratios, optionally some grey-scale and CMYK JPEGs."""
from __future__ import annotations

import io
import os
from typing import Dict, List, Sequence, Tuple

from .shards import ShardWriter
from .synthetic import make_sample


def jpeg_bytes(index: int, seed: int = 0, size: Tuple[int, int] = (96, 96), mode: str = "RGB",
               quality: int = 90) -> Tuple[bytes, str]:
    """(JPEG bytes of a width x height synthetic scene, its caption); mode RGB | L | CMYK."""
    from PIL import Image
    img, cap = make_sample(index, seed, image_size=max(size))
    im = Image.fromarray(img).resize(size, Image.BILINEAR)
    if mode != "RGB":
        im = im.convert(mode)
    b = io.BytesIO()
    im.save(b, "JPEG", quality=quality)
    return b.getvalue(), cap


def write_test_shards(out_dir: str, num_shards: int = 2, per_shard: int = 12, seed: int = 0,
                      sizes: Sequence[Tuple[int, int]] = ((96, 64), (64, 96), (80, 80), (120, 48), (48, 100)),
                      grey: Sequence[int] = (3,), cmyk: Sequence[int] = (5,), text: bool = True,
                      image: bool = True, index: bool = True, prefix: str = "") -> Tuple[List[str], Dict[str, str]]:
    """Shards OUT/{prefix}00000.tar ... of real JPEGs; returns (shard paths, {key: caption})."""
    os.makedirs(out_dir, exist_ok=True)
    w = ShardWriter(out_dir, per_shard, index=index, name_of=lambda n: f"{prefix}{n:05d}.tar")
    caps: Dict[str, str] = {}
    for i in range(num_shards * per_shard):
        mode = "L" if i in grey else "CMYK" if i in cmyk else "RGB"
        data, cap = jpeg_bytes(i, seed, tuple(sizes[i % len(sizes)]), mode)
        key = f"{i // per_shard:05d}{i % per_shard:04d}"
        mem = {}
        if image:
            mem["jpg"] = data
        if text:
            mem["txt"] = cap.encode()
        w.write(key, mem)
        caps[key] = cap
    return w.close(), caps
