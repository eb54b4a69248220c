"""WebDataset loaders without DALI: Pillow in DataLoader workers (`cpu`) and batched nvJPEG (`nvjpeg`).

Both yield {"image": uint8 [B,3,S,S] on `device` (float normalised with `normalize=True`),
"text": int64 [B,L] CPU, "text_padding_mask": float32 [B,L] CPU (1 = padding), "caption": [str],
"key": ["shard:key"]}; image-only loaders (`modality="image"`) leave out the text entries.

Corrupt images (policy): run `python -m m3ae_engine.data.shards validate` before training. A sample
that still fails to decode during training is skipped, never fatal and never silent: it is counted
(`loader.corrupt_count`, `loader.corrupt_samples`), a warning names its shard and key (the first 20),
and its slot in the batch is filled with another sample of the same batch, so every batch keeps its
shape. A batch with no decodable image raises DataError. Over `max_corrupt_fraction` of the samples
read so far (default 1%, checked after 1,000 samples) also raises: the shards need `validate --fix`.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import warnings
from collections import deque
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..model.config import CC12M_MEAN, CC12M_STD
from ..ops.reference import normalize_image
from .order import RankOrder, check_resume, finite_length, resume_state
from .sources import DataError, Reader, build_table, decode_text, expand_sources
from .text_drop import TextDrop, tokenise_with_drop
from .transforms import (RATIO, SCALE, augment_gpu, augment_pil, decode_pil, jpeg_complete, jpeg_components,
                         sample_params)

MAX_WARNINGS = 20


class _ShardLoaderBase:
    decoder = "base"

    def __init__(self, sources, batch_size: int, image_size: int = 256, text_length: int = 64, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, device="cpu", normalize: bool = False,
                 random_crop: bool = True, flip: bool = True, scale=SCALE, ratio=RATIO,
                 modality: str = "paired", tokenizer=None, drop_last: bool = True,
                 max_corrupt_fraction: float = 0.01, use_index: bool = True,
                 paired_fraction: float = 1.0, random_drop_text: float = 0.0):
        from ..model.tokenizer import default_tokenizer
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if modality not in ("paired", "image"):
            raise ValueError(f"modality must be 'paired' or 'image' (text-only: TextLoader), got {modality!r}")
        self.paths = expand_sources(sources)
        self.table = build_table(self.paths, need_image=True, need_text=(modality == "paired"),
                                 use_idx=use_index)
        self.order = RankOrder(len(self.table), rank, world_size, seed, shuffle, epochs)
        self.batch_size, self.image_size, self.text_length = batch_size, image_size, text_length
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.normalize, self.random_crop, self.flip = normalize, random_crop, flip
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.modality = modality
        self.tokenizer = tokenizer or (default_tokenizer(text_length) if modality == "paired" else None)
        # partial pairing (official deterministic_drop_text / random_drop_text) by the sample's table index
        self.text_drop = TextDrop(paired_fraction, random_drop_text, seed)
        if self.text_drop.active and modality != "paired":
            raise ValueError("paired_fraction / random_drop_text drop captions: they need modality='paired'")
        self.drop_last = drop_last
        self.max_corrupt_fraction = max_corrupt_fraction
        self.reader = Reader(self.paths)
        self.step = 0
        self.samples_read = 0
        self.corrupt_count = 0
        self.corrupt_samples: List[str] = []

    # ----------------------------------------------------------------- positions
    @property
    def num_samples(self) -> int:
        return len(self.table)

    def __len__(self):
        return finite_length(self._end_step())

    @property
    def epoch(self) -> int:
        return (self.step * self.batch_size) // self.order.per_rank

    def _positions(self, step: int) -> List[int]:
        start = step * self.batch_size
        end = start + self.batch_size
        total = self.order.total()
        if total is not None:
            end = min(end, total)
        return list(range(start, end))

    def _end_step(self) -> Optional[int]:
        return self.order.num_batches(self.batch_size, self.drop_last)

    # ----------------------------------------------------------------- host side of a batch
    def _read(self, pos: int):
        epoch, idx = self.order.at(pos)
        t = self.table
        off, size = t.image[idx]
        img = self.reader.read(int(t.shard[idx]), int(off), int(size))
        cap = None
        if self.modality == "paired":
            toff, tsize = t.text[idx]
            cap = decode_text(self.reader.read(int(t.shard[idx]), int(toff), int(tsize)))
        return epoch, idx, img, cap

    def _tokenise(self, captions: Sequence[str], epochs: Sequence[int], indices: Sequence[int]):
        """(ids, padding mask, captions) with the captions partial pairing drops turned to padding / ""."""
        return tokenise_with_drop(self.tokenizer, captions, self.text_drop.flags(indices, epochs))

    def _finish(self, batch: Dict) -> Dict:
        """Main process: device transfer, normalisation, corrupt-sample accounting."""
        bad = batch.pop("corrupt")
        self.samples_read += len(batch["key"])
        for key, err in bad:
            self.corrupt_count += 1
            if len(self.corrupt_samples) < 1000:
                self.corrupt_samples.append(key)
            if self.corrupt_count <= MAX_WARNINGS:
                warnings.warn(f"skipping corrupt image {key}: {err} (validate the shards: python -m "
                              f"m3ae_engine.data.shards validate)", RuntimeWarning, stacklevel=3)
        if (self.samples_read >= 1000 and
                self.corrupt_count > self.max_corrupt_fraction * self.samples_read):
            raise DataError(f"{self.corrupt_count} of {self.samples_read} images read were corrupt "
                            f"(over {self.max_corrupt_fraction:.1%}), e.g. {self.corrupt_samples[:3]}; "
                            f"clean the shards with `python -m m3ae_engine.data.shards validate --fix`")
        img = batch["image"]
        if img.device != self.device:
            img = img.to(self.device, non_blocking=True)
        if self.normalize:  # the model's own normalisation (cached per-device constants: no stream wait)
            img = normalize_image(img, CC12M_MEAN, CC12M_STD)
        batch["image"] = img
        batch["decoder"] = self.decoder
        return batch

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return dict(resume_state(self), corrupt_count=self.corrupt_count, samples_read=self.samples_read)

    def load_state_dict(self, state: dict) -> None:
        self.step = check_resume(self, state)
        self.corrupt_count = int(state.get("corrupt_count", 0))
        self.samples_read = int(state.get("samples_read", 0))


def _fill_corrupt(images: List[Optional[np.ndarray]], keys, where: str) -> List[int]:
    """Donor of each slot: itself when its image decoded, else another good sample of the batch (the
    k-th bad slot takes the (k mod #good)-th good one). Callers copy the donor's caption and key too, so
    an image never travels with another sample's text."""
    good = [i for i, x in enumerate(images) if x is not None]
    if not good:
        raise DataError(f"no decodable image in a whole batch ({where}; first keys {keys[:3]}): "
                        f"the shards need `python -m m3ae_engine.data.shards validate --fix`")
    donors = list(range(len(images)))
    for n, i in enumerate([i for i, x in enumerate(images) if x is None]):
        donors[i] = good[n % len(good)]
    return donors


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style: item `step` is the whole batch `step` (decoded, augmented, tokenised) on the CPU."""

    def __init__(self, loader: "PillowLoader"):
        self.loader = loader

    def __len__(self):  # unused by the step sampler; DataLoader only needs indexing
        return 2 ** 62

    def __getitem__(self, step: int):
        L = self.loader
        imgs, caps, keys, bad, visits = [], [], [], [], []
        for pos in L._positions(step):
            epoch, idx, data, cap = L._read(pos)
            visits.append((epoch, idx))
            key = L.table.key(idx)
            try:
                im = decode_pil(data)
                box, fl = sample_params(L.seed, epoch, idx, im.height, im.width, L.scale, L.ratio,
                                        L.random_crop, L.flip)
                imgs.append(augment_pil(im, L.image_size, box, fl))
            except Exception as e:  # any decoder failure: corrupt / truncated / unsupported image
                imgs.append(None)
                bad.append((key, f"{type(e).__name__}: {e}"))
            caps.append(cap)
            keys.append(key)
        donors = _fill_corrupt(imgs, keys, f"batch {step}")
        imgs, caps, keys, visits = ([seq[d] for d in donors] for seq in (imgs, caps, keys, visits))
        out = {"image": torch.from_numpy(np.stack(imgs)), "key": keys, "corrupt": bad}
        if L.modality == "paired":
            out["text"], out["text_padding_mask"], out["caption"] = L._tokenise(
                caps, [e for e, _ in visits], [i for _, i in visits])
        return out


class _Steps:
    def __init__(self, start: int, end: Optional[int]):
        self.start, self.end = start, end

    def __iter__(self):
        s = self.start
        while self.end is None or s < self.end:
            yield s
            s += 1


class PillowLoader(_ShardLoaderBase):
    """Fallback: Pillow decoding + transforms in torch DataLoader worker processes (`num_workers`)."""
    decoder = "cpu"

    def __init__(self, sources, batch_size: int, image_size: int = 256, text_length: int = 64, *,
                 num_workers: Optional[int] = None, prefetch_factor: int = 2, **kw):
        super().__init__(sources, batch_size, image_size, text_length, **kw)
        self.num_workers = (min(8, max(1, (os.cpu_count() or 2) - 1)) if num_workers is None else num_workers)
        self.prefetch_factor = prefetch_factor

    @property
    def threads(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[Dict]:
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        kw = dict(num_workers=self.num_workers)
        if self.num_workers > 0:
            kw["prefetch_factor"] = self.prefetch_factor
        dl = torch.utils.data.DataLoader(_BatchDataset(self), batch_size=None,
                                         sampler=_Steps(self.step, self._end_step()),
                                         pin_memory=self.device.type == "cuda", **kw)
        for batch in dl:
            self.step += 1
            yield self._finish(batch)


class NvJpegLoader(_ShardLoaderBase):
    """GPU decoding without DALI: tar reads + tokenisation on CPU threads, batched nvJPEG decoding
    (torchvision.io.decode_jpeg(list, device="cuda")), crop/resize/flip/normalise as torch ops on the GPU.
    A batch the batched decoder rejects is decoded image by image; an image nvJPEG cannot decode
    (CMYK, progressive oddities, non-JPEG) goes through Pillow; one nothing decodes is skipped (policy above)."""
    decoder = "nvjpeg"

    def __init__(self, sources, batch_size: int, image_size: int = 256, text_length: int = 64, *,
                 num_threads: int = 4, prefetch: int = 4, device="cuda", **kw):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the nvjpeg loader decodes on a CUDA device, got device={device}")
        if not torch.cuda.is_available():
            raise RuntimeError("the nvjpeg loader needs a CUDA GPU (none available)")
        try:
            from torchvision.io import ImageReadMode, decode_jpeg  # noqa: F401
        except Exception as e:
            raise RuntimeError(f"the nvjpeg loader needs torchvision (import failed: {e})") from e
        super().__init__(sources, batch_size, image_size, text_length, device=device, **kw)
        self.num_threads, self.prefetch = num_threads, prefetch

    @property
    def threads(self) -> int:
        return self.num_threads

    def _host_batch(self, step: int):
        items = [self._read(pos) for pos in self._positions(step)]
        out = {"epoch": [e for e, _, _, _ in items], "idx": [i for _, i, _, _ in items],
               "data": [d for _, _, d, _ in items], "key": [self.table.key(i) for _, i, _, _ in items]}
        if self.modality == "paired":
            caps = [c for _, _, _, c in items]
            out["text"], out["text_padding_mask"], out["caption"] = self._tokenise(caps, out["epoch"], out["idx"])
        return out

    def _decode(self, data: List[bytes], keys, bad):
        from torchvision.io import ImageReadMode, decode_jpeg
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        # nvJPEG gets the 1- and 3-component JPEGs; CMYK/YCCK (4), non-JPEG and unparseable go to Pillow
        # a truncated JPEG goes to Pillow too, which refuses it (decode_pil): nvJPEG would half-decode it
        jpeg = [i for i, d in enumerate(data) if jpeg_components(d) in (1, 3) and jpeg_complete(d)]
        out: List[Optional[torch.Tensor]] = [None] * len(data)
        if jpeg:
            try:
                dec = decode_jpeg([tensors[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
                for i, t in zip(jpeg, dec):
                    out[i] = t
            except Exception:
                for i in jpeg:
                    try:
                        out[i] = decode_jpeg(tensors[i], mode=ImageReadMode.RGB, device=self.device)
                    except Exception:
                        pass
        for i, t in enumerate(out):
            if t is None:
                try:
                    im = np.asarray(decode_pil(data[i]), dtype=np.uint8).transpose(2, 0, 1)
                    out[i] = torch.from_numpy(np.ascontiguousarray(im)).to(self.device, non_blocking=True)
                except Exception as e:
                    bad.append((keys[i], f"{type(e).__name__}: {e}"))
        return out

    def _gpu_batch(self, hb: Dict, step: int) -> Dict:
        bad: List = []
        dec = self._decode(hb["data"], hb["key"], bad)
        donors = _fill_corrupt(dec, hb["key"], f"batch {step}")  # the same policy as the Pillow loader
        ok = [i for i, t in enumerate(dec) if t is not None]
        boxes, flips = [], []
        for i in ok:
            _, h, w = dec[i].shape
            box, fl = sample_params(self.seed, hb["epoch"][i], hb["idx"][i], h, w, self.scale, self.ratio,
                                    self.random_crop, self.flip)
            boxes.append(box)
            flips.append(fl)
        imgs = augment_gpu([dec[i] for i in ok], self.image_size, boxes, flips)  # [len(ok), 3, S, S]
        out = {"image": imgs, "key": hb["key"], "corrupt": bad}
        for k in ("text", "text_padding_mask", "caption"):
            if k in hb:
                out[k] = hb[k]
        if len(ok) < len(dec):  # corrupt slots take a donor's image AND its text, caption and key
            row = {i: r for r, i in enumerate(ok)}
            out["image"] = imgs[torch.tensor([row[d] for d in donors], device=imgs.device)]
            index = torch.tensor(donors)
            for k in ("text", "text_padding_mask"):
                if k in out:
                    out[k] = out[k][index]
            for k in ("key", "caption"):
                if k in out:
                    out[k] = [out[k][d] for d in donors]
        return out

    def __iter__(self) -> Iterator[Dict]:
        end = self._end_step()
        pool = cf.ThreadPoolExecutor(self.num_threads, thread_name_prefix="m3ae-nvjpeg")
        pending: deque = deque()
        nxt = self.step
        try:
            while True:
                while len(pending) < self.prefetch and (end is None or nxt < end):
                    pending.append((nxt, pool.submit(self._host_batch, nxt)))
                    nxt += 1
                if not pending:
                    return
                step, fut = pending.popleft()
                batch = self._gpu_batch(fut.result(), step)
                self.step = step + 1
                yield self._finish(batch)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
