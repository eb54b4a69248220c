"""The "triton" kernel backend: the fused Triton kernels of `m3ae_engine.kernels` behind the
engine-op signatures of `m3ae_engine.ops.TorchBackend`.

`make_backend` is the factory the dispatcher (ops._lazy_register) registers the first time "triton" is asked for.
The factory refuses with a reason when Triton cannot be imported, or when there is neither a CUDA
GPU nor the Triton CPU interpreter (TRITON_INTERPRET=1, which must be set before triton is imported).
"""
from __future__ import annotations

import os

import torch

from .errors import BackendUnavailable


class TritonBackend:
    name = "triton"

    def __init__(self):
        from .. import kernels  # noqa: F401  (imports triton and registers the m3ae:: custom ops)
        self._k = kernels

    def gather(self, image_tokens, text_tokens, cls, row_source, image_row_of=None, text_row_of=None):
        return self._k.gather(image_tokens, text_tokens, cls, row_source, image_row_of, text_row_of)

    def unshuffle(self, visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos,
                  row_of_visible=None):
        return self._k.unshuffle(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos,
                                 row_of_visible)

    def masked_mse(self, pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss=False, mean=None, std=None):
        return self._k.masked_mse(pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss, mean, std)

    def linear_cross_entropy(self, hidden, weight, bias, targets, row_weight):
        if weight.dtype != hidden.dtype and weight.is_floating_point() and hidden.is_floating_point():
            weight = weight.to(hidden.dtype)  # the kernel runs one matmul dtype: the activations'
        return self._k.masked_linear_cross_entropy(hidden, weight, bias, targets, row_weight)


def make_backend() -> TritonBackend:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"triton is not installed ({e})") from e
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable("no CUDA GPU, and the Triton CPU interpreter is off "
                                     "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)")
    return TritonBackend()

