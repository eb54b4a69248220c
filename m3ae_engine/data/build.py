"""`build_loader`: the best available WebDataset loader, and `MixedLoader` for unpaired data."""
from __future__ import annotations

from typing import Dict, Iterator

import numpy as np
import torch

from .dali import DaliLoader, dali_available
from .pillow_nvjpeg import NvJpegLoader, PillowLoader
from .text_files import TextLoader

DECODERS = ("auto", "dali", "nvjpeg", "cpu")


def nvjpeg_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
        return True
    except Exception:
        return False


def best_decoder(device) -> str:
    """dali (installed, any device) > nvjpeg (CUDA + torchvision) > cpu (Pillow workers)."""
    device = torch.device(device)
    if device.type == "cuda" and dali_available():
        return "dali"
    if device.type == "cuda" and nvjpeg_available():
        return "nvjpeg"
    if device.type == "cpu" and dali_available():
        return "dali"
    return "cpu"


def build_loader(sources, batch_size: int, image_size: int = 256, text_length: int = 64, *,
                 decoder: str = "auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                 device=None, modality: str = "paired", **kw):
    """A loader over WebDataset shards yielding {"image" (on `device`), "text", "text_padding_mask"
    (CPU), ...}; `decoder`: auto | dali | nvjpeg | cpu; `loader.decoder` says which one runs.
    `modality="image"` reads image-only shards, `modality="text"` text files / text shards.
    Extra keyword arguments go to the loader (epochs, shuffle, normalize, random_crop, flip,
    num_workers / num_threads, shuffle_buffer, ...)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    common = dict(rank=rank, world_size=world_size, seed=seed)
    if modality == "text":
        return TextLoader(sources, batch_size, text_length, **common, **_without(kw, "text"))
    if decoder == "auto":
        decoder = best_decoder(device)
    cls = {"dali": DaliLoader, "nvjpeg": NvJpegLoader, "cpu": PillowLoader}[decoder]
    return cls(sources, batch_size, image_size, text_length, device=device, modality=modality, **common,
               **_without(kw, decoder))


# Worker options a run passes whatever decoder `auto` picks; each loader drops those it has no use for.
# Any other unknown keyword reaches the loader and is an error there (a misspelt option is not ignored).
_NOT_USED_BY = {"dali": ("num_workers",), "nvjpeg": ("num_workers", "shuffle_buffer"),
                "cpu": ("num_threads", "shuffle_buffer"), "text": ("num_workers", "num_threads", "shuffle_buffer")}


def _without(kw: dict, loader: str) -> dict:
    return {k: v for k, v in kw.items() if k not in _NOT_USED_BY[loader]}


def mix_schedule(ratios: Dict[str, float], seed: int, step: int, block: int = 100) -> str:
    """Which source feeds step `step`: each block of `block` steps holds exactly round(ratio * block)
    steps of each source (largest remainder), in an order shuffled by (seed, block number)."""
    names = sorted(ratios)
    w = np.array([float(ratios[n]) for n in names])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mix ratios must be >= 0 with a positive sum, got {ratios}")
    w = w / w.sum()
    raw = w * block
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: block - counts.sum()]:
        counts[i] += 1
    b, i = divmod(step, block)
    slots = np.repeat(np.arange(len(names)), counts)
    slots = np.random.default_rng([seed, 13, b]).permutation(slots)
    return names[int(slots[i])]


class MixedLoader:
    """Interleave paired, image-only and text-only loaders at configured ratios.

    `loaders` maps a tag ("paired", "image", "text", or any name) to a loader; `ratios` maps the same
    tags to weights. Each batch carries `batch["modality"]` = its tag: feed "paired" batches to
    model(image, text, mask), "image" to model(image) and "text" to model(text=..., text_padding_mask=...).
    The schedule is deterministic by seed (see `mix_schedule`); sub-loaders are endless (epochs=None)
    (the mix ends when a finite one runs out). state_dict() holds the step and every sub-loader's state."""

    def __init__(self, loaders: Dict[str, object], ratios: Dict[str, float], seed: int = 0, block: int = 100):
        if set(loaders) != set(ratios):
            raise ValueError(f"loaders {sorted(loaders)} and ratios {sorted(ratios)} must name the same sources")
        self.loaders, self.ratios, self.seed, self.block = dict(loaders), dict(ratios), seed, block
        mix_schedule(self.ratios, seed, 0, block)  # validates the ratios
        self.step = 0
        self._iters: Dict[str, Iterator] = {}

    @property
    def decoder(self) -> str:
        return ",".join(f"{k}:{getattr(v, 'decoder', '?')}" for k, v in self.loaders.items())

    def _next(self, tag: str):
        it = self._iters.get(tag)
        if it is None:
            it = self._iters[tag] = iter(self.loaders[tag])
        return next(it)

    def __iter__(self):
        while True:
            tag = mix_schedule(self.ratios, self.seed, self.step, self.block)
            try:
                batch = dict(self._next(tag))
            except StopIteration:  # a finite sub-loader ran out: the mix ends
                return
            batch["modality"] = tag
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"step": self.step, "loaders": {k: v.state_dict() for k, v in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for k, v in self.loaders.items():
            v.load_state_dict(state["loaders"][k])
        self._iters = {}


# ---------------------------------------------------------------------------------------------- train.py glue
def add_data_args(parser) -> None:
    """--data / --image-data / --text-data / --mix / --decoder / --data-workers for a training script."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, nargs="+",
                   help="paired WebDataset shards: paths, globs or brace patterns (default: synthetic data)")
    g.add_argument("--image-data", default=None, nargs="+", help="image-only shards (unpaired)")
    g.add_argument("--text-data", default=None, nargs="+", help="text-only files (one caption a line) / shards")
    g.add_argument("--mix", default=None, help="ratios, e.g. paired=0.8,image=0.1,text=0.1")
    g.add_argument("--decoder", default="auto", choices=DECODERS, help="JPEG decoding (default: best available)")
    g.add_argument("--data-workers", type=int, default=None, help="CPU workers / threads of the loader")


def build_from_args(args, batch_size: int, image_size: int, text_length: int, *, rank: int = 0,
                    world_size: int = 1, device=None, seed: int = 0):
    """The training data for parsed `add_data_args` arguments: SyntheticBatches without --data, one
    loader for paired shards, a MixedLoader when unpaired sources are given."""
    from .synthetic import SyntheticBatches
    if not args.data and not args.image_data and not args.text_data:
        return SyntheticBatches(batch_size, image_size, text_length, seed=seed, rank=rank, world_size=world_size)
    kw = dict(decoder=args.decoder, rank=rank, world_size=world_size, seed=seed, device=device)
    if args.data_workers is not None:
        kw["num_workers"] = kw["num_threads"] = args.data_workers
    loaders = {}
    if args.data:
        loaders["paired"] = build_loader(args.data, batch_size, image_size, text_length, **kw)
    if args.image_data:
        loaders["image"] = build_loader(args.image_data, batch_size, image_size, text_length, modality="image", **kw)
    if args.text_data:
        loaders["text"] = build_loader(args.text_data, batch_size, image_size, text_length, modality="text", **kw)
    if len(loaders) == 1 and not args.mix:
        return next(iter(loaders.values()))
    if args.mix:
        try:
            ratios = {k.strip(): float(v) for k, v in (p.split("=") for p in args.mix.split(","))}
        except ValueError:
            raise ValueError(f"--mix must look like paired=0.8,image=0.1,text=0.1, got {args.mix!r}") from None
    else:
        ratios = {k: 1.0 for k in loaders}
    if set(ratios) != set(loaders):
        raise ValueError(f"--mix names {sorted(ratios)} but the data given is {sorted(loaders)}")
    return MixedLoader(loaders, ratios, seed=seed)


def model_inputs(batch: dict) -> dict:
    """Keyword arguments for M3AE.forward from any loader's batch (paired, image-only or text-only)."""
    mod = batch.get("modality", "paired" if "image" in batch and "text" in batch else
                    "image" if "image" in batch else "text")
    out = {}
    if mod in ("paired", "image"):
        out["image"] = batch["image"]
    if mod in ("paired", "text"):
        out["text"], out["text_padding_mask"] = batch["text"], batch["text_padding_mask"]
    return out
