"""The public, differentiable op API and the single place that picks an implementation.

Choice per call: `backend=` argument, else env `M3AE_KERNELS=cuda|triton|torch`, else the fastest
available (CUDA extension on a GPU, then Triton on a GPU, then torch). A backend registers itself
with `register_backend(name, factory)`; the factory returns an object with the four engine ops
(`gather`, `unshuffle`, `masked_mse`, `linear_cross_entropy`) or raises `BackendUnavailable`
with the reason.

MAE drop-in contracts (same inputs, same outputs as facebookresearch/mae `models_mae.py`):
  random_masking(x, mask_ratio, noise=None) -> (x_masked, mask, ids_restore)
  unshuffle(x_visible, ids_restore, mask_token, cls_first=False) -> x_full
  masked_mse_loss(imgs, pred, mask, patch_size, norm_pix_loss=False) -> loss
  masked_linear_cross_entropy(hidden, weight, bias, targets, valid) -> (loss, accuracy)   (official M3AE)
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference
from .errors import BackendUnavailable  # noqa: F401 (part of the op API)
from .index_maps import inverse_map

BACKEND_ORDER = ("cuda", "triton", "torch")  # fastest first; see benchmarks/results for the measurement
# Per-op exceptions to the order, from the H100 measurement (benchmarks/results/cuda_kernels_*.json,
# M3AE-large, B=256): the fused gather's forward+backward is not yet faster than torch's index +
# index_put (bf16 1.17 ms CUDA, 1.85 ms Triton, 0.92 ms torch), so `auto` keeps torch for it until
# the kernel reaches its floor (benchmarks/NOTES_gather.md). Those were eager timings (host launch cost
# included); re-decide on the device clock of benchmarks/kernels.py and on the step time of throughput.py.
OP_ORDER = {"gather": ("torch", "cuda", "triton")}




class TorchBackend:
    """Plain PyTorch: the references themselves, autograd provides the backward."""
    name = "torch"

    @staticmethod
    def gather(image_tokens, text_tokens, cls, row_source, image_row_of=None, text_row_of=None):
        return reference.gather(image_tokens, text_tokens, cls, row_source)

    @staticmethod
    def unshuffle(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos,
                  row_of_visible=None):
        return reference.unshuffle(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos)

    @staticmethod
    def masked_mse(pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss=False, mean=None, std=None):
        return reference.masked_mse(pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss, mean, std)

    @staticmethod
    def linear_cross_entropy(hidden, weight, bias, targets, row_weight):
        return reference.masked_linear_cross_entropy(hidden, weight, bias, targets, row_weight)


_FACTORIES: Dict[str, Callable[[], object]] = {"torch": lambda: TorchBackend()}
_INSTANCES: Dict[str, object] = {}
_REASONS: Dict[str, str] = {}


def register_backend(name: str, factory: Callable[[], object]) -> None:
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)
    _REASONS.pop(name, None)


def _load(name: str):
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name in _REASONS:
        return None
    if name not in _FACTORIES:
        _lazy_register(name)
    factory = _FACTORIES.get(name)
    if factory is None:
        _REASONS[name] = "not implemented in this build"
        return None
    try:
        inst = factory()
    except BackendUnavailable as e:
        _REASONS[name] = str(e)
        return None
    except ImportError as e:  # an optional dependency is missing
        _REASONS[name] = f"import failed: {e}"
        return None
    _INSTANCES[name] = inst
    return inst


def _lazy_register(name: str) -> None:
    """The built-in compiled backends live in modules imported on first use (Triton, the CUDA extension)."""
    try:
        if name == "triton":
            from . import triton_backend
            register_backend("triton", triton_backend.make_backend)
        elif name == "cuda":
            from . import cuda_backend
            register_backend("cuda", cuda_backend.make_backend)
    except ImportError as e:
        _REASONS[name] = f"import failed: {e}"


def available_backends() -> Dict[str, str]:
    """{name: "available" | reason it is not} for every known backend."""
    out = {}
    for name in BACKEND_ORDER:
        out[name] = "available" if _load(name) is not None else _REASONS.get(name, "unavailable")
    return out


@torch.compiler.assume_constant_result  # dynamo must not trace the lazy backend import below
def resolve_backend(backend: Optional[str] = None, device: Optional[torch.device] = None,
                    op: Optional[str] = None) -> str:
    """The backend name a call uses (argument, then M3AE_KERNELS, then the fastest available for `op`)."""
    choice = backend or os.environ.get("M3AE_KERNELS") or "auto"
    if choice != "auto":
        if choice not in BACKEND_ORDER:
            raise ValueError(f"unknown kernel backend {choice!r}; choose one of {', '.join(BACKEND_ORDER)} or auto")
        if _load(choice) is None:
            raise BackendUnavailable(f"kernel backend {choice!r} is unavailable: {_REASONS.get(choice)}; "
                                     f"available: {[n for n, s in available_backends().items() if s == 'available']}")
        return choice
    on_gpu = device is not None and torch.device(device).type == "cuda"
    for name in OP_ORDER.get(op, BACKEND_ORDER):
        if name != "torch" and not on_gpu:
            continue  # the compiled backends only pay on a GPU
        if _load(name) is not None:
            return name
    return "torch"


def get_backend(backend: Optional[str] = None, device=None, op: Optional[str] = None):
    return _load(resolve_backend(backend, device, op))


# ----------------------------------------------------------------------------------------------
# engine ops (index maps from m3ae_engine.model.masking)
# ----------------------------------------------------------------------------------------------
def gather(image_tokens, text_tokens, cls, row_source, image_row_of=None, text_row_of=None, backend=None):
    """Packed visible rows [T, D] (see reference.gather). The inverse maps speed up the backward."""
    ref = image_tokens if image_tokens is not None else text_tokens
    return get_backend(backend, ref.device, "gather").gather(image_tokens, text_tokens, cls, row_source,
                                                   image_row_of, text_row_of)


def unshuffle_rows(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos,
                   row_of_visible=None, backend=None):
    """Decoder input rows [R, D] (see reference.unshuffle)."""
    return get_backend(backend, visible.device, "unshuffle").unshuffle(visible, mask_tokens, type_embeddings, pos_table,
                                                          row_visible, row_kind, row_pos, row_of_visible)


def masked_mse(pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss=False, mean=None, std=None,
               backend=None):
    """Weighted per-patch MSE against the raw image (see reference.masked_mse)."""
    return get_backend(backend, pred.device, "masked_mse").masked_mse(pred, imgs, patch_index, row_weight, patch_size,
                                                        norm_pix_loss, mean, std)


def linear_cross_entropy(hidden, weight, bias, targets, row_weight, backend=None):
    """(weighted CE sum, weighted accuracy sum) of a linear head on selected rows.

    Under autocast the matmul operands are cast to the autocast dtype here (as F.linear would) and the
    op runs with autocast off, so fused backends see one consistent dtype and keep their fp32 buffers.
    Outside autocast, mixed hidden/weight dtypes are each backend's business (the Triton kernel casts
    the weight to the activations' dtype; the torch and CUDA paths take them as they are).
    """
    impl = get_backend(backend, hidden.device, "linear_cross_entropy")
    dev_type = hidden.device.type
    if torch.is_autocast_enabled(dev_type):
        dtype = torch.get_autocast_dtype(dev_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(dev_type, enabled=False):
            return impl.linear_cross_entropy(hidden, weight, bias, targets, row_weight)
    return impl.linear_cross_entropy(hidden, weight, bias, targets, row_weight)


# ----------------------------------------------------------------------------------------------
# MAE drop-in contracts
# ----------------------------------------------------------------------------------------------
def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None, backend=None):
    """MAE's random_masking: x [N, L, D] -> (x_masked [N, K, D], mask [N, L], ids_restore [N, L])."""
    _check(x.dim() == 3, f"random_masking: x must be [N, L, D], got {tuple(x.shape)}")
    _check(0.0 <= mask_ratio <= 1.0, f"random_masking: mask_ratio must be in [0, 1], got {mask_ratio}")
    n, l, d = x.shape
    k = int(l * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, l, device=x.device)
    _check(tuple(noise.shape) == (n, l), f"random_masking: noise must be [{n}, {l}], got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :k]
    rows = torch.arange(n, device=x.device)[:, None]
    row_source = (rows * l + ids_keep).reshape(-1).to(torch.int32)  # [N*K]
    row_of = torch.where(ids_restore < k, rows * k + ids_restore, -1).reshape(-1).to(torch.int32)  # [N*L]
    x_masked = gather(x, None, None, row_source, row_of, None, backend=backend).view(n, k, d)
    mask = (ids_restore >= k).float()  # MAE: float32, 0 keep / 1 removed
    return x_masked, mask, ids_restore


def unshuffle(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
              cls_first: bool = False, backend=None) -> torch.Tensor:
    """MAE decoder's append-mask-tokens + unshuffle: [N, K(+1), D] -> [N, L(+1), D]."""
    _check(x_visible.dim() == 3, f"unshuffle: x_visible must be [N, K, D], got {tuple(x_visible.shape)}")
    n, kv, d = x_visible.shape
    _check(ids_restore.dim() == 2 and ids_restore.shape[0] == n,
           f"unshuffle: ids_restore must be [{n}, L], got {tuple(ids_restore.shape)}")
    _check(mask_token.numel() == d, f"unshuffle: mask_token must have {d} elements, got {mask_token.numel()}")
    l = ids_restore.shape[1]
    k = kv - 1 if cls_first else kv
    _check(0 <= k <= l, f"unshuffle: {k} visible tokens for {l} positions")
    s = l + 1 if cls_first else l
    dev = x_visible.device
    rows = torch.arange(n, device=dev)[:, None]
    off = 1 if cls_first else 0
    vis = torch.where(ids_restore < k, rows * kv + off + ids_restore, -1)  # [N, L]
    kind = torch.zeros(n, l, dtype=torch.int64, device=dev)
    if cls_first:
        vis = torch.cat([rows * kv, vis], 1)
        kind = torch.cat([torch.full((n, 1), reference.KIND_CLS, device=dev), kind], 1)
    vis_flat = vis.reshape(-1)
    mask_tokens = torch.stack([mask_token.reshape(d), mask_token.reshape(d)])  # image slot used
    out = unshuffle_rows(x_visible.reshape(n * kv, d), mask_tokens, None, None,
                         vis_flat.to(torch.int32), kind.reshape(-1).to(torch.int32),
                         torch.zeros(n * s, dtype=torch.int32, device=dev),
                         inverse_map(vis_flat, 0, n * kv), backend=backend)
    return out.view(n, s, d)


def masked_mse_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                    norm_pix_loss: bool = False, backend=None) -> torch.Tensor:
    """MAE's forward_loss: imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L] (1 = removed)."""
    _check(imgs.dim() == 4, f"masked_mse_loss: imgs must be [N, C, H, W], got {tuple(imgs.shape)}")
    n, c, h, w = imgs.shape
    _check(h % patch_size == 0 and w % patch_size == 0,
           f"masked_mse_loss: image {h}x{w} is not divisible by patch_size {patch_size}")
    l = (h // patch_size) * (w // patch_size)
    _check(tuple(pred.shape) == (n, l, patch_size * patch_size * c),
           f"masked_mse_loss: pred must be [{n}, {l}, {patch_size * patch_size * c}], got {tuple(pred.shape)}")
    _check(tuple(mask.shape) == (n, l), f"masked_mse_loss: mask must be [{n}, {l}], got {tuple(mask.shape)}")
    weight = (mask.float() / mask.float().sum()).reshape(-1)
    index = torch.arange(n * l, device=imgs.device, dtype=torch.int32)
    return masked_mse(pred.reshape(n * l, -1), imgs, index, weight, patch_size, norm_pix_loss, backend=backend)


def masked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                targets: torch.Tensor, valid: torch.Tensor, backend=None
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Official M3AE text loss without materialising logits in the fused backends.

    hidden [B, L, D], weight [V, D], bias [V] or None, targets and valid [B, L]; CE summed over
    valid tokens, divided per sample by max(count, 1e-5), averaged over the batch.
    """
    _check(hidden.dim() == 3, f"masked_linear_cross_entropy: hidden must be [B, L, D], got {tuple(hidden.shape)}")
    b, l, d = hidden.shape
    _check(weight.dim() == 2 and weight.shape[1] == d,
           f"masked_linear_cross_entropy: weight must be [V, {d}], got {tuple(weight.shape)}")
    _check(tuple(targets.shape) == (b, l) and tuple(valid.shape) == (b, l),
           f"masked_linear_cross_entropy: targets and valid must be [{b}, {l}]")
    v = valid.float()
    row_weight = (v / v.sum(-1, keepdim=True).clamp_min(1e-5) / b).reshape(-1)
    return linear_cross_entropy(hidden.reshape(b * l, d), weight, bias, targets.reshape(-1), row_weight,
                                backend=backend)
