"""Data: synthetic image-caption pairs (default), WebDataset shards (DALI / nvJPEG / Pillow)."""
from .synthetic import SyntheticBatches, SyntheticImageText, make_sample  # noqa: F401
