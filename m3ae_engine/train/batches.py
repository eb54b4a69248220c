"""What one rank trains on: the paired (or image-only) batches, the unpaired text and image streams, their
masking noise, and the data checks that run before any work.

Determinism across world sizes: the masks are drawn from a generator seeded by (seed, step) for the
whole GLOBAL batch, and each rank takes the rows of its own samples (the data is split the same way).
So 2 ranks x 4 samples see exactly the masks of 1 rank x 8, and a resumed run draws what the
uninterrupted one did (the generator state is a function of the step, not of history).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..data.sources import expand_braces, split_sources
from ..model.config import ConfigError, M3AEConfig
from .config import TrainConfig
from .runtime import DistInfo

UNPAIRED_SEED_OFFSET = 7_777_777  # unpaired text draws its own captions and masks
UNPAIRED_IMAGE_SEED_OFFSET = 5_555_557  # unpaired images draw their own images and masks
EVAL_SEED_OFFSET = 1_000_003  # eval batches and masks come from a stream training never reads


class MaskNoise:
    """Uniform masking noise for the rows of this rank's micro-batch (see module docstring)."""

    def __init__(self, seed: int, num_patches: int, text_length: int, global_batch: int, sharing: str):
        self.seed, self.li, self.lt, self.g, self.sharing = seed, num_patches, text_length, global_batch, sharing
        self.gen = torch.Generator()
        self._cached = (None, None)

    def __call__(self, step: int, micro: int, rank: int, world: int, batch: int):
        if self.sharing == "batch":  # official M3AE: one permutation per device and micro-batch
            self.gen.manual_seed(hash((self.seed, step, micro, rank)) & 0x7FFFFFFFFFFF)
            rows = torch.rand(1, self.li + self.lt, generator=self.gen)
        else:
            if self._cached[0] != step:
                self.gen.manual_seed((self.seed * 1_000_003 + step) & 0x7FFFFFFFFFFF)
                self._cached = (step, torch.rand(self.g, self.li + self.lt, generator=self.gen))
            off = (micro * world + rank) * batch
            rows = self._cached[1][off:off + batch]
        return rows[:, :self.li], rows[:, self.li:]



def _require_files(spec: str, flag: str) -> None:
    """A data pattern that matches no file at all is a config error, raised before any work (the
    loader itself then names any single missing or unreadable shard)."""
    import glob
    for pattern in expand_braces(spec):
        if glob.glob(pattern) if any(c in pattern for c in "*?[") else Path(pattern).exists():
            return
    raise ConfigError(f"{flag}: no file matches {spec!r} (missing data path)")



def check_data(cfg: TrainConfig):
    """Fail before any work when a data pattern matches no file (paired data and unpaired text);
    returns the shard loader's builder, or None for synthetic data."""
    if cfg.unpaired_text_data not in (None, "synthetic"):
        for spec in split_sources(cfg.unpaired_text_data):
            _require_files(spec, "--unpaired-text-data")
    if cfg.unpaired_image_data not in (None, "synthetic"):
        for spec in split_sources(cfg.unpaired_image_data):
            _require_files(spec, "--unpaired-image-data")
    if cfg.data == "synthetic":
        return None
    from ..data import build_loader
    for spec in split_sources(cfg.data):
        _require_files(spec, "--data")
    return build_loader



def text_drop_options(cfg: TrainConfig) -> dict:
    """Partial pairing (official deterministic_drop_text / random_drop_text) for the training data's
    loader; empty when every caption is kept, so loaders see no new option in a plain run."""
    if cfg.paired_fraction == 1 and cfg.random_drop_text == 0:
        return {}
    return {"paired_fraction": cfg.paired_fraction, "random_drop_text": cfg.random_drop_text}



def build_data(cfg: TrainConfig, model_config: M3AEConfig, info: DistInfo, micro: int, build_loader=None,
               seed: Optional[int] = None, drop_text: bool = True):
    """The paired (or MAE-mode image) training data; drop_text=False: every caption kept (held-out eval)."""
    drop = text_drop_options(cfg) if drop_text else {}
    if build_loader is None:
        from ..data import SyntheticBatches
        return SyntheticBatches(micro, model_config.image_size, model_config.text_length,
                                seed=cfg.seed if seed is None else seed, size=cfg.dataset_size,
                                rank=info.rank, world_size=info.world_size, **drop)
    return build_loader(split_sources(cfg.data), batch_size=micro, image_size=model_config.image_size,
                        text_length=model_config.text_length, seed=cfg.seed, rank=info.rank,
                        world_size=info.world_size, **image_loader_options(cfg, info),
                        modality="image" if cfg.modality == "image" else "paired", **drop)



def image_loader_options(cfg: TrainConfig, info: DistInfo) -> dict:
    """Workers and decode device of a loader that decodes images: this rank's GPU, capped workers."""
    return dict(num_workers=capped_workers(cfg.num_workers, info),
                device=f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")



def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or Slurm's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1



def capped_workers(requested: int, info: DistInfo) -> int:
    """DataLoader workers <= this rank's share of the available cores (more only oversubscribe them)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cap = max(1, available_cores() // max(1, local_ranks))
    if requested > cap:
        if info.is_main:
            print(f"note: --num-workers {requested} reduced to {cap}: {available_cores()} core(s) available to "
                  f"{local_ranks} rank(s) on this machine", flush=True)
        return cap
    return requested



def build_unpaired(cfg: TrainConfig, model_config: M3AEConfig, info: DistInfo, micro: int, modality: str):
    """Batches of one modality for an unpaired term: "text" (the official unpaired text term:
    synthetic captions, or text files / text shards) or "image" (image-only forwards: synthetic
    images, or image-only / paired shards read without their captions); None when not asked for.
    Each has its own seed, so it draws other samples than the paired stream."""
    spec, offset = ((cfg.unpaired_text_data, UNPAIRED_SEED_OFFSET) if modality == "text"
                    else (cfg.unpaired_image_data, UNPAIRED_IMAGE_SEED_OFFSET))
    if spec is None:
        return None
    if spec == "synthetic":  # the unused half (images of the text term, captions of the image term) is dropped
        from ..data import SyntheticBatches
        return SyntheticBatches(micro, model_config.image_size, model_config.text_length,
                                seed=cfg.seed + offset, rank=info.rank, world_size=info.world_size)
    from ..data import build_loader
    image_kw = image_loader_options(cfg, info) if modality == "image" else {}
    return build_loader(split_sources(spec), batch_size=micro, image_size=model_config.image_size,
                        text_length=model_config.text_length, seed=cfg.seed + offset,
                        rank=info.rank, world_size=info.world_size, modality=modality, **image_kw)



def unpaired_image_per_rank(cfg: TrainConfig, info: DistInfo) -> int:
    """Image-only samples per rank per micro-step: unpaired_image_ratio x batch_size over all ranks and
    micro-steps, which must divide evenly (as the paired batch) so 2 ranks see what 1 rank sees."""
    if cfg.unpaired_image_data is None:
        return 0
    total = cfg.unpaired_image_batch_size
    if total % (cfg.grad_accum * info.world_size):
        raise ConfigError(f"unpaired_image_ratio x batch_size = {total} image-only samples per step must be "
                          f"divisible by grad_accum x world size = {cfg.grad_accum} x {info.world_size}")
    return total // (cfg.grad_accum * info.world_size)



def micro_batch(batch: dict, modality: str, unpaired: Optional[dict], unpaired_noise,
                unpaired_image: Optional[dict] = None, unpaired_image_noise=None) -> dict:
    """The dict the runtime's forward reads: image-only in MAE mode, plus the unpaired text and the
    unpaired images if any."""
    out = {"image": batch["image"]} if modality == "image" else dict(batch)
    if unpaired is not None:
        out.update(unpaired_text=unpaired["text"], unpaired_text_padding_mask=unpaired["text_padding_mask"],
                   unpaired_text_noise=unpaired_noise)
    if unpaired_image is not None:
        out.update(unpaired_image=unpaired_image["image"], unpaired_image_noise=unpaired_image_noise)
    return out



@dataclass
class Streams:
    """The batches of one rank for one run: paired (or MAE-mode image) data, and the optional unpaired text
    and image streams, each with the masking noise of its own seed. `next(step, m)` is micro-step m's
    input; `state_dict` / `load_state_dict` carry every stream's position through a checkpoint."""
    data: object
    noise: MaskNoise
    micro: int  # samples per rank per micro-step
    modality: str
    unpaired_text: Optional[object] = None
    unpaired_text_noise: Optional[MaskNoise] = None
    unpaired_images: Optional[object] = None
    unpaired_image_noise: Optional[MaskNoise] = None
    micro_images: int = 0  # image-only samples per rank per micro-step

    def start(self) -> None:
        self._iters = [iter(s) if s is not None else None
                       for s in (self.data, self.unpaired_text, self.unpaired_images)]

    def next(self, step: int, m: int, info: DistInfo):
        """(the dict the runtime's forward reads, the paired masking noise) of micro-step m of `step`."""
        data_it, text_it, image_it = self._iters
        batch = next(data_it)
        text = next(text_it) if text_it is not None else None
        text_noise = self.unpaired_text_noise(step, m, info.rank, info.world_size, self.micro)[1] if text else None
        images = next(image_it) if image_it is not None else None
        image_noise = (self.unpaired_image_noise(step, m, info.rank, info.world_size, self.micro_images)[0]
                       if images else None)
        return (batch, micro_batch(batch, self.modality, text, text_noise, images, image_noise),
                self.noise(step, m, info.rank, info.world_size, self.micro))

    def state_dict(self) -> dict:
        def state(s):
            return s.state_dict() if hasattr(s, "state_dict") else None
        return {"data": state(self.data), "unpaired_text_data": state(self.unpaired_text),
                "unpaired_image_data": state(self.unpaired_images)}

    def load_state_dict(self, client: dict) -> None:
        for stream, key in ((self.data, "data"), (self.unpaired_text, "unpaired_text_data"),
                            (self.unpaired_images, "unpaired_image_data")):
            if stream is not None and hasattr(stream, "load_state_dict") and client.get(key) is not None:
                stream.load_state_dict(client[key])


def build_streams(cfg: TrainConfig, model_config: M3AEConfig, info: DistInfo, micro: int, build_loader=None
                  ) -> Streams:
    def noise(offset: int, global_batch: int) -> MaskNoise:
        return MaskNoise(cfg.seed + offset, model_config.num_patches, model_config.text_length, global_batch,
                         model_config.mask_sharing)

    streams = Streams(build_data(cfg, model_config, info, micro, build_loader), noise(0, cfg.batch_size), micro,
                      cfg.modality)
    streams.unpaired_text = build_unpaired(cfg, model_config, info, micro, "text")
    streams.unpaired_text_noise = noise(UNPAIRED_SEED_OFFSET, cfg.batch_size)
    streams.micro_images = unpaired_image_per_rank(cfg, info)
    if streams.micro_images:
        streams.unpaired_images = build_unpaired(cfg, model_config, info, streams.micro_images, "image")
        streams.unpaired_image_noise = noise(UNPAIRED_IMAGE_SEED_OFFSET, cfg.unpaired_image_batch_size)
    return streams
