"""Model configuration: one dataclass, five presets, validation with clear errors.

Dimensions follow the official M3AE code (young-geng/m3ae_public, m3ae/model.py): the encoder
grows with the preset, the decoder is always 512 wide, 8 deep, 16 heads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Tuple

# (emb_dim, depth, num_heads) of the encoder per preset; `tiny` exists for tests and CPU runs.
ENCODER_PRESETS = {
    "tiny": dict(emb_dim=64, depth=2, num_heads=4, dec_emb_dim=32, dec_depth=1, dec_num_heads=2,
                 image_size=32, patch_size=8, text_length=32),
    "small": dict(emb_dim=384, depth=12, num_heads=6),
    "base": dict(emb_dim=768, depth=12, num_heads=12),
    "large": dict(emb_dim=1024, depth=24, num_heads=16),
    "huge": dict(emb_dim=1280, depth=32, num_heads=16),
}

CC12M_MEAN = (0.5762, 0.5503, 0.5213)
CC12M_STD = (0.3207, 0.3169, 0.3307)
BERT_VOCAB_SIZE = 30522


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


@dataclass
class M3AEConfig:
    # encoder
    emb_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    # decoder (official: always 512 / 8 / 16)
    dec_emb_dim: int = 512
    dec_depth: int = 8
    dec_num_heads: int = 16
    mlp_ratio: int = 4
    # inputs
    image_size: int = 256
    patch_size: int = 16
    in_channels: int = 3
    text_length: int = 64
    vocab_size: int = BERT_VOCAB_SIZE
    # masking
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.75
    mask_sharing: str = "sample"  # "sample" (MAE: one permutation per sample) | "batch" (official M3AE)
    # embeddings / blocks
    use_type_embedding: bool = True
    layer_norm_eps: float = 1e-6
    gelu: str = "tanh"  # "tanh" (flax default, official) | "exact"
    output_head_depth: int = 0  # official: 0 = one Linear per head; k > 0 = the official MLP heads (heads.py)
    # losses
    image_loss_weight: float = 1.0
    text_loss_weight: float = 0.5  # paper: 0.5; the official code's default flag is 0.1
    unpaired_text_loss_weight: float = 0.0
    norm_pix_loss: bool = False  # MAE's per-patch normalised target; off for M3AE, on for MAE
    image_all_token_loss: bool = False  # official flag: pixel loss over every patch, not only the masked ones
    text_all_token_loss: bool = False  # official flag: word loss over every non-padded token, not only masked
    image_mean: Tuple[float, float, float] = CC12M_MEAN
    image_std: Tuple[float, float, float] = CC12M_STD
    # implementation choices (no effect on the math)
    kernels: str = "auto"  # "auto" | "torch" | "triton" | "cuda"  (see m3ae_engine.ops)
    attention: str = "auto"  # see m3ae_engine.model.attention.available_backends()
    packed: bool = True  # run encoder/decoder on packed (varlen) sequences; False = padded + mask
    compile_blocks: bool = False  # torch.compile the attention-free halves of each block (dynamic T)
    preset: str = field(default="", repr=False)

    def __post_init__(self):
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.validate()

    # ---- derived sizes ----
    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def image_keep(self) -> int:
        """Kept image patches per sample: int(L * (1 - ratio)), as the official code."""
        return int(self.num_patches * (1.0 - self.image_mask_ratio))

    @property
    def text_keep(self) -> int:
        """Kept text positions per sample, chosen over the padded length."""
        return int(self.text_length * (1.0 - self.text_mask_ratio))

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.num_heads

    @property
    def dec_head_dim(self) -> int:
        return self.dec_emb_dim // self.dec_num_heads

    # ---- construction ----
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "M3AEConfig":
        if name not in ENCODER_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(ENCODER_PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown M3AEConfig field(s) {unknown}; valid fields: {sorted(fields)}")
        values = dict(ENCODER_PRESETS[name])
        values.update(overrides)
        return cls(preset=name, **values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "M3AEConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown M3AEConfig field(s) {unknown}")
        return cls(**d)

    # ---- validation ----
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for name in ("emb_dim", "depth", "num_heads", "dec_emb_dim", "dec_depth", "dec_num_heads",
                     "mlp_ratio", "image_size", "patch_size", "in_channels", "vocab_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive integer, got {v!r}")
        need(self.emb_dim % self.num_heads == 0,
             f"emb_dim ({self.emb_dim}) must be divisible by num_heads ({self.num_heads})")
        need(self.dec_emb_dim % self.dec_num_heads == 0,
             f"dec_emb_dim ({self.dec_emb_dim}) must be divisible by dec_num_heads ({self.dec_num_heads})")
        need(self.emb_dim % 4 == 0 and self.dec_emb_dim % 4 == 0,
             f"emb_dim and dec_emb_dim must be multiples of 4 for the 2-D sin-cos position embedding, "
             f"got {self.emb_dim} and {self.dec_emb_dim}")
        need(self.image_size % self.patch_size == 0,
             f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        need(isinstance(self.text_length, int) and self.text_length >= 1,
             f"text_length must be >= 1, got {self.text_length!r}")
        for name in ("image_mask_ratio", "text_mask_ratio"):
            r = getattr(self, name)
            need(isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= r <= 1.0,
                 f"{name} must be in [0, 1], got {r!r}")
        # keeping nothing (ratio 1: the decoder predicts from the other modality / CLS alone) runs as the
        # official code does. Masking no patch leaves the official masked pixel loss 0/0 = NaN: only the
        # all-token loss has something to reconstruct then. (No masked text gives the official text loss 0.)
        need(self.image_keep < self.num_patches or self.image_all_token_loss,
             f"image_mask_ratio {self.image_mask_ratio} masks none of the {self.num_patches} image patches, so "
             f"the pixel loss has nothing to reconstruct; raise image_mask_ratio or set image_all_token_loss")
        for name in ("image_all_token_loss", "text_all_token_loss"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        need(self.mask_sharing in ("sample", "batch"),
             f"mask_sharing must be 'sample' or 'batch', got {self.mask_sharing!r}")
        need(isinstance(self.output_head_depth, int) and not isinstance(self.output_head_depth, bool)
             and self.output_head_depth >= 0,
             f"output_head_depth must be an integer >= 0, got {self.output_head_depth!r}")
        need(self.gelu in ("tanh", "exact"), f"gelu must be 'tanh' or 'exact', got {self.gelu!r}")
        need(self.kernels in ("auto", "torch", "triton", "cuda"),
             f"kernels must be one of auto, torch, triton, cuda; got {self.kernels!r}")
        from .attention import BACKENDS as ATTENTION_BACKENDS  # late import: attention imports masking only
        need(self.attention in ("auto",) + tuple(ATTENTION_BACKENDS),
             f"attention must be auto or one of {', '.join(ATTENTION_BACKENDS)}; got {self.attention!r}")
        need(self.layer_norm_eps > 0, f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        need(len(self.image_mean) == self.in_channels and len(self.image_std) == self.in_channels,
             f"image_mean/image_std need {self.in_channels} values")
        need(all(s > 0 for s in self.image_std), f"image_std must be positive, got {self.image_std}")
        for name in ("image_loss_weight", "text_loss_weight", "unpaired_text_loss_weight"):
            w = getattr(self, name)
            need(isinstance(w, (int, float)) and w >= 0, f"{name} must be >= 0, got {w!r}")
