"""Data: synthetic image-caption pairs (default), WebDataset shards (DALI / nvJPEG / Pillow).

`build_loader(sources, batch_size, image_size, text_length, decoder="auto|dali|nvjpeg|cpu", ...)` reads
img2dataset-style WebDataset shards; `MixedLoader` mixes paired, image-only and text-only data;
`python -m m3ae_engine.data.shards {write,index,validate,stats}` makes and checks shards.
"""
from .synthetic import SyntheticBatches, SyntheticImageText, make_sample  # noqa: F401
from .sources import DataError, expand_sources  # noqa: F401
from .pillow_nvjpeg import NvJpegLoader, PillowLoader  # noqa: F401
from .text_files import TextLoader  # noqa: F401
from .dali import DaliLoader, dali_available  # noqa: F401
from .build import (MixedLoader, add_data_args, best_decoder, build_from_args, build_loader,  # noqa: F401
                    mix_schedule, model_inputs, nvjpeg_available)
