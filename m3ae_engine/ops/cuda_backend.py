"""The CUDA C++ backend: `m3ae_engine._C` kernels (csrc/*.cu) behind differentiable torch ops.

`_C` links no libtorch: every call passes raw device pointers, shapes, dtype codes, the device index
and torch's current CUDA stream, so one build serves every torch release. Each op is a
`torch.library.custom_op` in the namespace "m3ae_cuda" (with a fake implementation for
torch.compile / meta tensors, and its backward registered with `torch.library.register_autograd`),
so `torch.compile(fullgraph=True)` sees one opaque node per op.

  gather       forward: one row-copy kernel; backward: row copies through the inverse maps + CLS sum
  unshuffle    forward: one row kernel (mask token, position, type fused); backward: row copy + sums by kind
  masked_mse   forward/backward: patches read straight from the raw image, per-patch norm fused
  linear_cross_entropy: matmuls in torch (cuBLAS), per row chunk the kernel computes log-sum-exp, CE,
               argmax and writes the softmax gradient in place; memory O(chunk x V), no [N, V] logits kept

This module imports cleanly without a GPU and without `_C`; its factory `make_backend` then refuses with
the reason, which `ops.available_backends()` shows.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from .errors import BackendUnavailable
from .chunked_lce import CHUNK_BYTES, chunked_linear_cross_entropy
from .index_maps import decoder_row_of_visible, inverse_map

try:  # the compiled extension is optional (no nvcc at install time, or M3AE_BUILD_CUDA=0)
    from .. import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = e

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LCE_CHUNK_BYTES = CHUNK_BYTES  # logits memory per chunk (M3AE_LCE_CHUNK_BYTES); the tests shrink it
_REDUCE_CHUNK_ROWS = 256 if _C is None else int(_C.REDUCE_CHUNK_ROWS)


def _custom_op(name: str):
    return torch.library.custom_op(f"m3ae_cuda::{name}", mutates_args=(), device_types="cuda")


def _code(t: torch.Tensor) -> int:
    try:
        return _DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"m3ae_cuda: unsupported dtype {t.dtype}") from None


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _stream(t: torch.Tensor) -> int:
    if t.device.type != "cuda":  # only the CPU emulation of _C in the tests passes host tensors
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def _dev(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 0
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _rows2d(x: torch.Tensor, d: int) -> torch.Tensor:
    """[..., d] -> [rows, d] with unit column stride (a view whenever possible)."""
    x = x.reshape(-1, d)
    return x if x.stride(1) == 1 else x.contiguous()


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def _reduce_workspace(rows: int, slots: int, d: int, device) -> torch.Tensor:
    chunks = max(1, -(-rows // _REDUCE_CHUNK_ROWS))
    return torch.empty(chunks * slots * d, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# gather
# ----------------------------------------------------------------------------------------------
def _gather_impl(image: Optional[torch.Tensor], text: Optional[torch.Tensor], cls: Optional[torch.Tensor],
                 row_source: torch.Tensor, image_row_of: Optional[torch.Tensor],
                 text_row_of: Optional[torch.Tensor]) -> torch.Tensor:
    ref = image if image is not None else text
    d = ref.shape[-1]
    dtype = ref.dtype
    img = _rows2d(image, d) if image is not None else None
    txt = _rows2d(text.to(dtype), d) if text is not None else None
    c = cls.reshape(d).to(dtype).contiguous() if cls is not None else None
    src = _i32(row_source)
    out = torch.empty(src.numel(), d, dtype=dtype, device=ref.device)
    if src.numel() == 0:  # no row (nothing kept): _C needs non-null out/row_source pointers, and there is no work
        return out
    _C.gather_forward(out.data_ptr(), _ptr(img), img.stride(0) if img is not None else d,
                      img.shape[0] if img is not None else 0, _ptr(txt), txt.stride(0) if txt is not None else d,
                      txt.shape[0] if txt is not None else 0, _ptr(c), src.data_ptr(), src.numel(), d,
                      _code(out), _dev(out), _stream(out))
    return out


_gather = _custom_op("gather")(_gather_impl)


@_gather.register_fake
def _(image, text, cls, row_source, image_row_of, text_row_of):
    ref = image if image is not None else text
    return ref.new_empty((row_source.shape[0], ref.shape[-1]))


def _gather_backward_impl(grad: torch.Tensor, row_source: torch.Tensor, image_row_of: Optional[torch.Tensor],
                          text_row_of: Optional[torch.Tensor], n_image: int, n_text: int,
                          need_cls: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_image [n_image, D], grad_text [n_text, D], grad_cls fp32 [D] or [0])."""
    d = grad.shape[-1]
    g = grad.contiguous()
    src = _i32(row_source)
    rows = src.numel()
    gi = g.new_empty((n_image, d))
    gt = g.new_empty((n_text, d))
    gc = g.new_empty((d if need_cls else 0,), dtype=torch.float32)
    if rows == 0:  # nothing was gathered: every input gradient is zero
        return gi.zero_(), gt.zero_(), gc.zero_()
    iro = _i32(image_row_of) if n_image else None
    tro = _i32(text_row_of) if n_text else None
    ws = _reduce_workspace(rows, 1, d, g.device) if need_cls else None
    _C.gather_backward(g.data_ptr(), rows, d, src.data_ptr(), _ptr(gi), _ptr(iro), n_image, _ptr(gt), _ptr(tro),
                       n_text, _ptr(gc), _ptr(ws), ws.numel() if ws is not None else 0, _code(g), _dev(g),
                       _stream(g))
    return gi, gt, gc


_gather_backward = _custom_op("gather_backward")(_gather_backward_impl)


@_gather_backward.register_fake
def _(grad, row_source, image_row_of, text_row_of, n_image, n_text, need_cls):
    d = grad.shape[-1]
    return (grad.new_empty((n_image, d)), grad.new_empty((n_text, d)),
            grad.new_empty((d if need_cls else 0,), dtype=torch.float32))


def _gather_setup(ctx, inputs, output):
    image, text, cls, row_source, image_row_of, text_row_of = inputs
    ctx.meta = [(t.shape, t.dtype) if t is not None else None for t in (image, text, cls)]
    ctx.save_for_backward(row_source, image_row_of, text_row_of)


def _gather_grad(ctx, grad):
    row_source, image_row_of, text_row_of = ctx.saved_tensors
    (img_meta, txt_meta, cls_meta) = ctx.meta
    n_image = img_meta[0].numel() // img_meta[0][-1] if img_meta is not None else 0
    n_text = txt_meta[0].numel() // txt_meta[0][-1] if txt_meta is not None else 0
    need = ctx.needs_input_grad
    n_image = n_image if need[0] else 0
    n_text = n_text if need[1] else 0
    if n_image and image_row_of is None:
        image_row_of = inverse_map(row_source, 0, n_image)
    if n_text and text_row_of is None:
        lo = img_meta[0].numel() // img_meta[0][-1] if img_meta is not None else 0
        text_row_of = inverse_map(row_source, lo, n_text)
    gi, gt, gc = _gather_backward(grad, row_source, image_row_of, text_row_of, n_image, n_text,
                                  bool(need[2] and cls_meta is not None))
    out_i = gi.view(img_meta[0]).to(img_meta[1]) if n_image else None
    out_t = gt.view(txt_meta[0]).to(txt_meta[1]) if n_text else None
    out_c = gc.view(cls_meta[0]).to(cls_meta[1]) if gc.numel() else None
    return out_i, out_t, out_c, None, None, None


_gather.register_autograd(_gather_grad, setup_context=_gather_setup)


# ----------------------------------------------------------------------------------------------
# unshuffle
# ----------------------------------------------------------------------------------------------
def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _unshuffle_impl(visible: torch.Tensor, mask_tokens: torch.Tensor, type_embeddings: Optional[torch.Tensor],
                    pos_table: Optional[torch.Tensor], row_visible: torch.Tensor, row_kind: torch.Tensor,
                    row_pos: torch.Tensor, row_of_visible: Optional[torch.Tensor]) -> torch.Tensor:
    d = visible.shape[-1]
    vis = _rows2d(visible, d)
    mt = _f32(mask_tokens).reshape(2, d)
    ty = _f32(type_embeddings).reshape(2, d) if type_embeddings is not None else None
    pt = _f32(pos_table).reshape(-1, d) if pos_table is not None else None
    rv, rk, rp = _i32(row_visible), _i32(row_kind), _i32(row_pos)
    out = torch.empty(rv.numel(), d, dtype=visible.dtype, device=visible.device)
    if rv.numel() == 0:  # no decoder row: _C needs non-null out and row-map pointers
        return out
    _C.unshuffle_forward(out.data_ptr(), _ptr(vis), vis.stride(0), vis.shape[0], mt.data_ptr(), _ptr(ty), _ptr(pt),
                         pt.shape[0] if pt is not None else 0, rv.data_ptr(), rk.data_ptr(), rp.data_ptr(),
                         rv.numel(), d, _code(out), _dev(out), _stream(out))
    return out


_unshuffle = _custom_op("unshuffle")(_unshuffle_impl)


@_unshuffle.register_fake
def _(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos, row_of_visible):
    return visible.new_empty((row_visible.shape[0], visible.shape[-1]))


def _unshuffle_backward_impl(grad: torch.Tensor, row_visible: torch.Tensor, row_kind: torch.Tensor,
                             row_of_visible: torch.Tensor, n_visible: int, need_params: bool,
                             with_types: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_visible [n_visible, D], fp32 [4, D] = mask img, mask txt, type img, type txt (or [2, D] / [0]))."""
    d = grad.shape[-1]
    g = grad.contiguous()
    rv, rk = _i32(row_visible), _i32(row_kind)
    rows = rv.numel()
    gv = g.new_empty((n_visible, d))
    slots = (4 if with_types else 2) if need_params else 0
    gp = g.new_empty((slots, d), dtype=torch.float32)
    if rows == 0:  # no decoder row: nothing flows back
        return gv.zero_(), gp.zero_()
    ws = _reduce_workspace(rows, slots, d, g.device) if slots else None
    rov = _i32(row_of_visible) if n_visible else None
    _C.unshuffle_backward(g.data_ptr(), rows, d, rv.data_ptr(), rk.data_ptr(), _ptr(gv), _ptr(rov), n_visible,
                          _ptr(gp), gp.data_ptr() + 2 * d * 4 if slots == 4 else 0, _ptr(ws),
                          ws.numel() if ws is not None else 0, _code(g), _dev(g), _stream(g))
    return gv, gp


_unshuffle_backward = _custom_op("unshuffle_backward")(_unshuffle_backward_impl)


@_unshuffle_backward.register_fake
def _(grad, row_visible, row_kind, row_of_visible, n_visible, need_params, with_types):
    d = grad.shape[-1]
    slots = (4 if with_types else 2) if need_params else 0
    return grad.new_empty((n_visible, d)), grad.new_empty((slots, d), dtype=torch.float32)


def _unshuffle_setup(ctx, inputs, output):
    visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos, row_of_visible = inputs
    ctx.meta = (visible.shape, visible.dtype, mask_tokens.shape, mask_tokens.dtype,
                None if type_embeddings is None else (type_embeddings.shape, type_embeddings.dtype))
    ctx.save_for_backward(row_visible, row_kind, row_of_visible)


def _unshuffle_grad(ctx, grad):
    row_visible, row_kind, row_of_visible = ctx.saved_tensors
    vshape, vdtype, mshape, mdtype, tmeta = ctx.meta
    need = ctx.needs_input_grad
    d = vshape[-1]
    n_visible = vshape.numel() // d if need[0] else 0
    if n_visible and row_of_visible is None:
        row_of_visible = decoder_row_of_visible(row_visible, row_kind, n_visible)
    with_types = tmeta is not None and bool(need[2])
    need_params = bool(need[1]) or with_types
    gv, gp = _unshuffle_backward(grad, row_visible, row_kind,
                                 row_of_visible if row_of_visible is not None else row_visible,
                                 n_visible, need_params, with_types)
    g_vis = gv.view(vshape).to(vdtype) if n_visible else None
    g_mask = gp[:2].reshape(mshape).to(mdtype) if need[1] else None
    g_type = gp[2:4].reshape(tmeta[0]).to(tmeta[1]) if with_types else None
    return g_vis, g_mask, g_type, None, None, None, None, None


_unshuffle.register_autograd(_unshuffle_grad, setup_context=_unshuffle_setup)


# ----------------------------------------------------------------------------------------------
# masked_mse
# ----------------------------------------------------------------------------------------------
def _norm_args(imgs: torch.Tensor, mean, std) -> Tuple[List[float], List[float]]:
    if imgs.dtype == torch.uint8:
        if mean is None or std is None:
            raise ValueError("masked_mse: uint8 images need mean and std")
        return [float(m) for m in mean], [float(s) for s in std]
    return [], []


def _mse_common(pred, imgs, patch_index, row_weight, patch_size):
    if imgs.dim() != 4:
        raise ValueError(f"masked_mse: imgs must be [B, C, H, W], got {tuple(imgs.shape)}")
    b, c, h, w = imgs.shape
    p = int(patch_size)
    if p * p * c != pred.shape[-1]:
        raise ValueError(f"masked_mse: pred rows have {pred.shape[-1]} values, patches {p * p * c}")
    pr = _rows2d(pred, pred.shape[-1])
    im = imgs.contiguous()
    return pr, im, _i32(patch_index), row_weight.to(torch.float32).contiguous(), (b, c, h, w, p)


def _masked_mse_impl(pred: torch.Tensor, imgs: torch.Tensor, patch_index: torch.Tensor, row_weight: torch.Tensor,
                     patch_size: int, norm_pix_loss: bool, mean: Sequence[float],
                     std: Sequence[float]) -> torch.Tensor:
    pr, im, pi, rw, (b, c, h, w, p) = _mse_common(pred, imgs, patch_index, row_weight, patch_size)
    rows = pr.shape[0]
    row_loss = torch.empty(rows, dtype=torch.float32, device=pred.device)
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    if rows == 0:  # no masked patch: an empty sum (_C needs non-null pred/index/weight pointers)
        return loss.zero_()
    _C.masked_mse_forward(pr.data_ptr(), pr.stride(0), _code(pr), im.data_ptr(), _code(im), b, c, h, w, p,
                          pi.data_ptr(), rw.data_ptr(), rows, bool(norm_pix_loss), list(mean), list(std),
                          _ptr(row_loss), loss.data_ptr(), _dev(pr), _stream(pr))
    return loss


_masked_mse = _custom_op("masked_mse")(_masked_mse_impl)


@_masked_mse.register_fake
def _(pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss, mean, std):
    return pred.new_empty((), dtype=torch.float32)


def _masked_mse_backward_impl(grad_loss: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor,
                              patch_index: torch.Tensor, row_weight: torch.Tensor, patch_size: int,
                              norm_pix_loss: bool, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    pr, im, pi, rw, (b, c, h, w, p) = _mse_common(pred, imgs, patch_index, row_weight, patch_size)
    rows = pr.shape[0]
    grad_pred = torch.empty(rows, pr.shape[1], dtype=pred.dtype, device=pred.device)
    if rows == 0:
        return grad_pred.view(pred.shape)
    gl = grad_loss.to(torch.float32).reshape(1).contiguous()
    _C.masked_mse_backward(_ptr(grad_pred), pr.data_ptr(), pr.stride(0), _code(pr), im.data_ptr(), _code(im), b, c,
                           h, w, p, pi.data_ptr(), rw.data_ptr(), rows, bool(norm_pix_loss), list(mean), list(std),
                           gl.data_ptr(), _dev(pr), _stream(pr))
    return grad_pred.view(pred.shape)


_masked_mse_backward = _custom_op("masked_mse_backward")(_masked_mse_backward_impl)


@_masked_mse_backward.register_fake
def _(grad_loss, pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss, mean, std):
    return pred.new_empty(pred.shape)


def _mse_setup(ctx, inputs, output):
    pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss, mean, std = inputs
    ctx.args = (patch_size, norm_pix_loss, list(mean), list(std))
    ctx.save_for_backward(pred, imgs, patch_index, row_weight)


def _mse_grad(ctx, grad):
    pred, imgs, patch_index, row_weight = ctx.saved_tensors
    gp = None
    if ctx.needs_input_grad[0]:
        gp = _masked_mse_backward(grad, pred, imgs, patch_index, row_weight, *ctx.args)
    return gp, None, None, None, None, None, None, None


_masked_mse.register_autograd(_mse_grad, setup_context=_mse_setup)


# ----------------------------------------------------------------------------------------------
# masked linear cross-entropy
# ----------------------------------------------------------------------------------------------
def _lce_softmax_chunk(logits, bias32, targets, row_weight, row_loss, row_correct, v, write_grad):
    """The per-chunk kernel for m3ae_engine.ops.chunked_lce: logits [c, Vp] in place (csrc/masked_linear_cross_entropy.cu)."""
    _C.lce_softmax(logits.data_ptr(), logits.stride(0), _code(logits), _ptr(bias32), targets.data_ptr(),
                   row_weight.data_ptr(), logits.shape[0], v, row_loss.data_ptr(), row_correct.data_ptr(),
                   bool(write_grad), _dev(logits), _stream(logits))


def _linear_cross_entropy_impl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               targets: torch.Tensor, row_weight: torch.Tensor, compute_grad: bool
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, accuracy, grad_hidden, grad_weight, grad_bias); the grads are d loss / d input (empty
    without compute_grad) and are scaled by the incoming gradient in the backward. Matmuls in the
    hidden dtype (bf16/fp16 under autocast, fp32 otherwise); softmax math in fp32."""
    loss, acc, g_h, g_w, g_b = chunked_linear_cross_entropy(
        hidden, weight, bias, targets, row_weight, compute_grad, compute_grad, compute_grad, _lce_softmax_chunk,
        chunk_bytes=LCE_CHUNK_BYTES)
    e0 = hidden.new_empty((0,))
    if not compute_grad:
        return loss, acc, e0, e0.clone(), e0.clone()
    return loss, acc, g_h, g_w, g_b if g_b is not None else e0


_linear_cross_entropy = _custom_op("linear_cross_entropy")(_linear_cross_entropy_impl)


@_linear_cross_entropy.register_fake
def _(hidden, weight, bias, targets, row_weight, compute_grad):
    s = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:
        e0 = hidden.new_empty((0,))
        return s, s.clone(), e0, e0.clone(), e0.clone()
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
    return s, s.clone(), hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb


def _lce_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.computed = inputs[5]  # compute_grad: N = 0 rows give empty gradients that were still computed
    _, _, g_h, g_w, g_b = output
    ctx.save_for_backward(g_h, g_w, g_b)


def _lce_grad(ctx, grad_loss, grad_acc, _gh, _gw, _gb):
    g_h, g_w, g_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not ctx.computed and (need[0] or need[1] or (need[2] and ctx.has_bias)):
        raise RuntimeError("m3ae_cuda::linear_cross_entropy: gradients were not computed in the forward "
                           "(called under no_grad / inference mode?)")
    scale = grad_loss.to(torch.float32)
    gh = (g_h * scale).to(g_h.dtype) if need[0] else None
    gw = (g_w * scale).to(g_w.dtype) if need[1] else None
    gb = (g_b * scale).to(g_b.dtype) if (need[2] and ctx.has_bias) else None
    return gh, gw, gb, None, None, None


_linear_cross_entropy.register_autograd(_lce_grad, setup_context=_lce_setup)


# ----------------------------------------------------------------------------------------------
# the backend object
# ----------------------------------------------------------------------------------------------
def _check_float(name: str, t: Optional[torch.Tensor]):
    if t is not None and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32/bfloat16/float16, got {t.dtype}")


class CudaBackend:
    """The four engine ops on the CUDA C++ kernels; same signatures as ops.TorchBackend."""
    name = "cuda"

    @staticmethod
    def gather(image_tokens, text_tokens, cls, row_source, image_row_of=None, text_row_of=None):
        _check_float("gather", image_tokens if image_tokens is not None else text_tokens)
        return _gather(image_tokens, text_tokens, cls, row_source, image_row_of, text_row_of)

    @staticmethod
    def unshuffle(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos,
                  row_of_visible=None):
        _check_float("unshuffle", visible)
        return _unshuffle(visible, mask_tokens, type_embeddings, pos_table, row_visible, row_kind, row_pos,
                          row_of_visible)

    @staticmethod
    def masked_mse(pred, imgs, patch_index, row_weight, patch_size, norm_pix_loss=False, mean=None, std=None):
        _check_float("masked_mse", pred)
        m, s = _norm_args(imgs, mean, std)
        return _masked_mse(pred, imgs, patch_index, row_weight, int(patch_size), bool(norm_pix_loss), m, s)

    @staticmethod
    def linear_cross_entropy(hidden, weight, bias, targets, row_weight):
        _check_float("linear_cross_entropy", hidden)
        need = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        loss, acc, _, _, _ = _linear_cross_entropy(hidden, weight, bias, targets, row_weight, need)
        return loss, acc.detach()


def unavailable_reason() -> Optional[str]:
    """None when the backend can run here, else why not."""
    if _C is None:
        return f"extension m3ae_engine._C is not built ({_IMPORT_ERROR})"
    if _C.device_count() == 0:
        return f"m3ae_engine._C sees no CUDA device ({_C.device_status()})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"needs compute capability >= 8.0 (built for {_C.compiled_archs()}), device has {major}.{minor}"
    return None


def _smoke_test() -> None:
    """One tiny launch: catches a driver too old for the static runtime or a missing kernel image."""
    x = torch.arange(16, dtype=torch.float32, device="cuda").view(2, 8)
    out = _gather(x, None, None, torch.tensor([1, -2, 0], dtype=torch.int32, device="cuda"), None, None)
    torch.cuda.synchronize()
    expect = torch.stack([x[1], torch.zeros_like(x[0]), x[0]])
    if not torch.equal(out, expect):
        raise RuntimeError("smoke test gave wrong values")


def make_backend() -> CudaBackend:
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(reason)
    try:
        _smoke_test()
    except RuntimeError as e:
        raise BackendUnavailable(f"m3ae_engine._C failed its smoke test: {e}") from e
    return CudaBackend()

