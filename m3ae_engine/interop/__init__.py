"""Other formats: official M3AE pickles and flags, facebookresearch/mae `.pth`, timm export, our safetensors
export, train.py run folders; `load_model` reads any of them. `python -m m3ae_engine.convert` is cli.py."""
from .exported import save_checkpoint  # noqa: F401
from .load import load_model, read_checkpoint  # noqa: F401
from .report import ConversionError, ConversionReport  # noqa: F401
