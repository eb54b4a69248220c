"""Triton kernels, one file per op; imported as `m3ae_engine.kernels` (setuptools package_dir).

Each file holds the kernel(s), the autograd wiring (torch.library.custom_op "m3ae::NAME" with
register_fake and register_autograd, so torch.compile(fullgraph=True) runs through) and a drop-in
function with the signature of the engine op in m3ae_engine.ops.reference.
"""
from .gather import gather  # noqa: F401
from .unshuffle import unshuffle  # noqa: F401
from .masked_mse import masked_mse  # noqa: F401
from .masked_linear_cross_entropy import masked_linear_cross_entropy  # noqa: F401
