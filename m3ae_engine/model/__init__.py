"""The model: `M3AEConfig` and presets, `M3AE` (encoder, decoder, heads), attention backends, masking plans,
sin-cos positions, FLOPs, the WordPiece tokenizer. Imports only the op layer."""
from .config import ConfigError, M3AEConfig  # noqa: F401
from .m3ae import InputError, M3AE, M3AEOutput  # noqa: F401
