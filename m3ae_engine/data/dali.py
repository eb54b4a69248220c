"""DALI pipeline over WebDataset shards: `fn.readers.webdataset` with index files, JPEG decoding on the
GPU (`device="mixed"`, the hardware decoder where present) or on the CPU (`device_id=None`),
RandomResizedCrop + flip + (optional) normalisation in DALI, captions read as bytes and tokenised
in batches on the CPU. Resume is exact through DALI's pipeline checkpointing.

Ranks: DALI splits the sample list into `num_shards` contiguous parts (`shard_id` = rank); each epoch
every rank reads a different part (`stick_to_shard=False`), so ranks read disjoint samples within an
epoch and cover the set together. Shuffling is DALI's: a buffer of `shuffle_buffer` samples
(`initial_fill`) seeded by `seed` (+ rank).

Corrupt images: a truncated JPEG, which libjpeg-turbo half-decodes without an error (grey rows), is
caught by the loaders' shared rule (transforms.jpeg_complete, checked on the encoded bytes the pipeline
also returns) and treated as the other loaders do: skipped (its slot takes another sample of the batch,
image and caption), counted (`corrupt_count`, `corrupt_samples`) and named in a warning. A JPEG DALI
cannot decode at all stops the pipeline (DALI has no skip): that ends in a one-line DataError naming
the shard and sample when DALI says which, with the `validate --fix` hint. Validate shards offline first
(`python -m m3ae_engine.data.shards validate`). `auto` picks DALI on a CPU too: it measured fastest
there (data/README.md).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from ..model.config import CC12M_MEAN, CC12M_STD
from .sources import (IMAGE_EXTS, DataError, build_table, decode_text, expand_sources, index_is_current, index_path_for,
                      load_index, split_name, write_index)
from .text_drop import TextDrop, tokenise_with_drop
from .order import check_resume, finite_length, resume_state
from .transforms import RATIO, SCALE, jpeg_complete

MAX_WARNINGS = 20
_FAILED_SAMPLE = re.compile(r"Failed to decode sample #\d+ : (\S+)")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


def ensure_indices(paths: List[str], index_dir: Optional[str] = None):
    """(index file paths, ShardIndex objects): `<shard>.idx` next to each shard when present and current
    (sources.load_index decides), else written (next to the shard when the folder is writable, else
    into `index_dir` / a temp folder). Each shard is read or scanned once."""
    out, indices = [], []
    for p in paths:
        idx = index_path_for(p)
        ix = load_index(p)  # the .idx file when current (checked against the tar), else a header scan
        indices.append(ix)
        if index_dir is None and os.access(os.path.dirname(os.path.abspath(p)), os.W_OK):
            target = idx
        elif index_is_current(idx, p):
            target = idx
        else:  # a stable name per shard path (not hash(), which changes per process): reused across runs
            d = index_dir or os.path.join(tempfile.gettempdir(), "m3ae-dali-index")
            os.makedirs(d, exist_ok=True)
            digest = hashlib.sha1(os.path.abspath(p).encode()).hexdigest()[:16]
            target = os.path.join(d, f"{digest}-{os.path.basename(idx)}")
        if not index_is_current(target, p):
            write_index(ix, target)
        out.append(target)
    return out, indices


class DaliLoader:
    decoder = "dali"

    def __init__(self, sources, batch_size: int, image_size: int = 256, text_length: int = 64, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, device="cuda", normalize: bool = False,
                 random_crop: bool = True, flip: bool = True, scale=SCALE, ratio=RATIO,
                 modality: str = "paired", tokenizer=None, num_threads: int = 4,
                 shuffle_buffer: int = 4096, prefetch: int = 2, index_dir: Optional[str] = None,
                 hw_decoder_load: float = 0.65, paired_fraction: float = 1.0, random_drop_text: float = 0.0):
        from ..model.tokenizer import default_tokenizer
        if not dali_available():
            raise RuntimeError("DALI is not installed: pip install nvidia-dali-cuda130 (or -cuda120)")
        if modality not in ("paired", "image"):
            raise ValueError(f"modality must be 'paired' or 'image', got {modality!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("DALI on device cuda needs a CUDA GPU (none available); use device='cpu'")
        self.paths = expand_sources(sources)
        self.index_paths, indices = ensure_indices(self.paths, index_dir)
        table = build_table(self.paths, need_image=True, need_text=(modality == "paired"), indices=indices)
        self.num_samples = len(table)
        # partial pairing (official deterministic_drop_text / random_drop_text) by the sample's table index:
        # DALI names each caption it reads ("shard.tar:offset:member"), which maps back to that index
        self.text_drop = TextDrop(paired_fraction, random_drop_text, seed)
        if self.text_drop.active and modality != "paired":
            raise ValueError("paired_fraction / random_drop_text drop captions: they need modality='paired'")
        self._index_of = ({table.key(i): i for i in range(len(table))} if self.text_drop.active else None)
        self.batch_size, self.image_size, self.text_length = batch_size, image_size, text_length
        self.rank, self.world_size, self.seed, self.shuffle, self.epochs = rank, world_size, seed, shuffle, epochs
        self.normalize, self.random_crop, self.flip = normalize, random_crop, flip
        self.scale, self.ratio, self.modality = tuple(scale), tuple(ratio), modality
        self.tokenizer = tokenizer or (default_tokenizer(text_length) if modality == "paired" else None)
        self.num_threads, self.shuffle_buffer, self.prefetch = num_threads, shuffle_buffer, prefetch
        self.hw_decoder_load = hw_decoder_load
        self.per_rank = self.num_samples // world_size
        if self.per_rank < 1:
            raise DataError(f"{self.num_samples} samples cannot be split over {world_size} ranks")
        self.step = 0
        self._pipe = None
        self._checkpoint: Optional[str] = None
        self.corrupt_count = 0
        self.corrupt_samples: List[str] = []

    @property
    def threads(self) -> int:
        return self.num_threads

    # ------------------------------------------------------------------ pipeline
    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        gpu = self.device.type == "cuda"
        S = self.image_size
        exts = [";".join(IMAGE_EXTS)] + (["txt"] if self.modality == "paired" else [])
        seed = (self.seed * 1_000_003 + self.rank * 7919) % (2 ** 31)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=(self.device.index or 0) if gpu else None, seed=seed,
                      prefetch_queue_depth=self.prefetch, enable_checkpointing=True)
        def pipe():
            outs = fn.readers.webdataset(paths=self.paths, index_paths=self.index_paths, ext=exts,
                                         missing_component_behavior="skip", random_shuffle=self.shuffle,
                                         initial_fill=self.shuffle_buffer, shard_id=self.rank,
                                         num_shards=self.world_size, stick_to_shard=False,
                                         pad_last_batch=False, name="Reader", seed=seed)
            jpegs = outs[0] if isinstance(outs, (list, tuple)) else outs
            dev = "mixed" if gpu else "cpu"
            extra = {"hw_decoder_load": self.hw_decoder_load} if gpu else {}
            if self.random_crop:
                img = fn.decoders.image_random_crop(jpegs, device=dev, output_type=types.RGB,
                                                    random_area=list(self.scale),
                                                    random_aspect_ratio=list(self.ratio), num_attempts=10,
                                                    **extra)
                img = fn.resize(img, size=[S, S], interp_type=types.INTERP_CUBIC, antialias=True)
            else:
                img = fn.decoders.image(jpegs, device=dev, output_type=types.RGB, **extra)
                img = fn.resize(img, size=[S, S], mode="not_smaller", interp_type=types.INTERP_CUBIC,
                                antialias=True)
            mirror = fn.random.coin_flip(probability=0.5) if self.flip else 0
            if self.normalize:
                img = fn.crop_mirror_normalize(img, crop=[S, S], mirror=mirror, output_layout="CHW",
                                               dtype=types.FLOAT, mean=[m * 255 for m in CC12M_MEAN],
                                               std=[s * 255 for s in CC12M_STD])
            else:
                img = fn.crop_mirror_normalize(img, crop=[S, S], mirror=mirror, output_layout="CHW",
                                               dtype=types.UINT8)
            # the encoded bytes and their "shard:offset:member" name come back too: the host checks each
            # JPEG for truncation (jpeg_complete), names a bad one, and finds a sample's table index by it
            info = fn.get_property(jpegs, key="source_info")
            if self.modality == "paired":
                return img, jpegs, info, outs[1]
            return img, jpegs, info

        kw = {"checkpoint": self._checkpoint} if self._checkpoint else {}
        p = pipe(**kw)
        p.build()
        return p

    def _to_torch(self, tl) -> torch.Tensor:
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            t = tl.as_tensor()
            dtype = torch.float32 if self.normalize else torch.uint8
            out = torch.empty(tuple(t.shape()), dtype=dtype, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(tl.as_tensor()))

    # ------------------------------------------------------------------ iteration
    def _end_step(self) -> Optional[int]:
        return None if self.epochs is None else (self.epochs * self.per_rank) // self.batch_size

    @property
    def epoch(self) -> int:
        return (self.step * self.batch_size) // self.per_rank

    def __len__(self):
        return finite_length(self._end_step())

    def __iter__(self) -> Iterator[Dict]:
        if self._pipe is None:
            self._pipe = self._build()
        end = self._end_step()
        while end is None or self.step < end:
            try:
                outs = self._pipe.run()
            except RuntimeError as e:  # DALI cannot skip: one line naming the sample when DALI says which
                raise DataError(self._decode_error(e)) from None
            img = self._to_torch(outs[0])
            keys = [self._sample_key(np.array(outs[2][i]).tobytes().decode("utf-8", errors="replace"))
                    for i in range(len(outs[2]))]
            donors = self._skip_truncated(outs[1], keys)
            batch = {"image": img, "decoder": self.decoder, "key": keys}
            if donors is not None:  # truncated slots take a donor's image, caption and key
                batch["image"] = img[torch.tensor(donors, device=img.device)]
                batch["key"] = [keys[d] for d in donors]
            if self.modality == "paired":
                tl = outs[3]
                caps = [decode_text(bytes(np.array(tl[i]))) for i in range(len(tl))]
                if donors is not None:
                    caps = [caps[d] for d in donors]
                dropped = [False] * len(caps)
                if self.text_drop.active:
                    indices = [self._index_of[k] for k in batch["key"]]
                    dropped = self.text_drop.flags(indices, [self.epoch] * len(indices))
                batch["text"], batch["text_padding_mask"], batch["caption"] = tokenise_with_drop(
                    self.tokenizer, caps, dropped)
            self.step += 1
            yield batch

    def _skip_truncated(self, encoded, keys) -> Optional[List[int]]:
        """The donor of each slot when some JPEG of the batch is truncated (the Pillow and nvJPEG loaders'
        policy: counted, named, replaced by another sample of the batch), None when all are whole."""
        bad = [i for i in range(len(encoded)) if not jpeg_complete(np.array(encoded[i]).tobytes())]
        if not bad:
            return None
        good = [i for i in range(len(encoded)) if i not in bad]
        if not good:
            raise DataError(f"no decodable image in a whole batch (first keys {keys[:3]}): the shards need "
                            f"`python -m m3ae_engine.data.shards validate --fix`")
        donors = list(range(len(encoded)))
        for n, i in enumerate(bad):
            donors[i] = good[n % len(good)]
            self.corrupt_count += 1
            if len(self.corrupt_samples) < 1000:
                self.corrupt_samples.append(keys[i])
            if self.corrupt_count <= MAX_WARNINGS:
                warnings.warn(f"skipping corrupt image {keys[i]}: truncated JPEG (no end-of-image marker) "
                              f"(validate the shards: python -m m3ae_engine.data.shards validate)",
                              RuntimeWarning, stacklevel=3)
        return donors

    def _decode_error(self, e: Exception) -> str:
        m = _FAILED_SAMPLE.search(str(e))
        where = f"in {self._sample_key(m.group(1))}" if m else f"in one of the shards {self.paths[:3]}" + \
            ("..." if len(self.paths) > 3 else "") + " (DALI does not say which sample)"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "Critical error" not in ln
                 and "pipeline object" not in ln]
        detail = lines[-1] if lines else type(e).__name__
        return (f"DALI could not decode an image {where} ({detail}); DALI cannot skip it: clean the shards with "
                f"`python -m m3ae_engine.data.shards validate SHARDS --fix OUT` (the Pillow loader, "
                f"build_loader(decoder='cpu'), skips and counts such images)")

    @staticmethod
    def _sample_key(source_info: str) -> str:
        """DALI's "path:offset:dir/KEY.jpg" -> "path:dir/KEY", the table's key of the sample."""
        parts = source_info.rsplit(":", 2)
        if len(parts) != 3:
            return source_info
        return f"{parts[0]}:{split_name(parts[2])[0]}"

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        cp = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return dict(resume_state(self), dali_checkpoint=cp)

    def load_state_dict(self, state: dict) -> None:
        self.step = check_resume(self, state)
        self._checkpoint = state.get("dali_checkpoint")
        self._pipe = None
