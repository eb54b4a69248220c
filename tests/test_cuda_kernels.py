"""CUDA C++ kernels (m3ae_engine._C through m3ae_engine.ops.cuda_backend) against the references, on a GPU.

Every op, forward and gradients, at odd sizes (scalar fallbacks, unaligned rows, several chunks) and
at the realistic M3AE-large size (B=256, D=1024, Li=256/Ki=64, Lt=64/Kt=16, decoder 512, V=30522),
fp32 and bf16, with index maps from the real masking planner. Outputs are poisoned first (NaN bytes
left in the caching allocator, and NaN-filled buffers for direct _C calls) so unwritten elements
fail; repeated runs must be bit-identical. Where the Triton backend is available it is compared too.

Run: pytest -m gpu tests/test_cuda_kernels.py
"""
import pytest
import torch

from m3ae_engine import ops
from m3ae_engine.ops import reference
from m3ae_engine.model.masking import build_plan

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # norm-relative error bounds for reductions


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """fp32 references and kernels must not silently use TF32 (another module may enable it)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def cuda_backend():
    status = ops.available_backends()["cuda"]
    assert status == "available", f"CUDA backend unavailable on a GPU machine: {status}"
    return ops.get_backend("cuda")


def _triton():
    return ops.get_backend("triton") if ops.available_backends().get("triton") == "available" else None


def poison(nbytes_list):
    """Leave NaN bytes (0xFF) in the caching allocator's blocks so the next torch.empty of these sizes
    hands out garbage: an element the kernel forgets to write then fails the comparison."""
    blocks = [torch.full((max(1, int(n)),), 255, dtype=torch.uint8, device=DEV) for n in nbytes_list]
    del blocks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_close(a, b, dtype, what="", tol=None):
    """Elementwise closeness with atol taken relative to the reference's largest magnitude
    (gradients of mean losses are tiny: an absolute atol would make the check vacuous)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a.float()).all(), f"{what}: non-finite values (unwritten output?)"
    scale = b.float().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(a.float() / scale, b.float() / scale, **(tol or TOL[dtype]),
                               msg=lambda m: f"{what}: {m}")


def make_plan(b, li, ki, lt, kt, seed=0, has_image=True, has_text=True):
    g = torch.Generator().manual_seed(seed)
    pad = None
    if has_text:
        lengths = torch.randint(1, lt + 1, (b,), generator=g)
        pad = (torch.arange(lt)[None, :] >= lengths[:, None]).to(torch.int32)  # [B, Lt] 1 = padding
    plan = build_plan(b, li, ki, pad, lt, kt, has_image=has_image, packed=True, generator=g,
                      device="cpu")
    return plan.to(DEV)


SIZES = {  # (B, Li, Ki, Lt, Kt, D encoder, D decoder)
    "odd": (3, 9, 3, 7, 2, 36, 13),
    "odd_vec": (5, 16, 5, 11, 4, 40, 24),
    "large": (256, 256, 64, 64, 16, 1024, 512),
}


# ----------------------------------------------------------------------------------------------
# gather
# ----------------------------------------------------------------------------------------------
def _gather_case(cuda_backend, size, dtype, with_maps, backend_obj=None):
    be = backend_obj or cuda_backend
    b, li, ki, lt, kt, d, _ = SIZES[size]
    plan = make_plan(b, li, ki, lt, kt)
    torch.manual_seed(1)
    img = torch.randn(b, li, d, device=DEV, dtype=dtype, requires_grad=True)
    txt = torch.randn(b, lt, d, device=DEV, dtype=dtype, requires_grad=True)
    cls = torch.randn(d, device=DEV, dtype=torch.float32, requires_grad=True)
    src = plan.enc_row_source
    t = src.numel()
    g = torch.randn(t, d, device=DEV, dtype=dtype)
    poison([t * d * 4, b * li * d * 4, b * lt * d * 4])
    out = be.gather(img, txt, cls, src, plan.image_row_of if with_maps else None,
                    plan.text_row_of if with_maps else None)
    poison([b * li * d * 4, b * lt * d * 4, d * 4 * 64])
    grads = torch.autograd.grad(out, (img, txt, cls), g)
    return out, grads, (img, txt, cls, src, g)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_maps", [True, False])
def test_gather(cuda_backend, size, dtype, with_maps):
    out, (gi, gt, gc), (img, txt, cls, src, g) = _gather_case(cuda_backend, size, dtype, with_maps)
    ref = reference.gather(img.detach(), txt.detach(), cls.detach(), src)
    assert out.dtype == dtype and torch.equal(out, ref), "gather forward is a copy: must be exact"
    rgi, rgt = torch.autograd.grad(reference.gather(img, txt, cls, src), (img, txt), g)
    assert torch.equal(gi, rgi) and torch.equal(gt, rgt), "row gradients are copies: must be exact"
    ref_cls = g[src.long() == reference.CLS_SOURCE].float().sum(0)
    assert gc.dtype == cls.dtype
    torch.testing.assert_close(gc, ref_cls, rtol=1e-5, atol=1e-5)
    # repeated runs: bit-identical
    out2, (gi2, gt2, gc2), _ = _gather_case(cuda_backend, size, dtype, with_maps)
    assert torch.equal(out, out2) and torch.equal(gi, gi2) and torch.equal(gt, gt2) and torch.equal(gc, gc2)
    tb = _triton()
    if tb is not None:
        tout, (tgi, tgt, tgc), _ = _gather_case(cuda_backend, size, dtype, with_maps, tb)
        assert torch.equal(out, tout) and torch.equal(gi, tgi) and torch.equal(gt, tgt)
        torch.testing.assert_close(gc, tgc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_image_only_and_random_masking(cuda_backend, dtype):
    torch.manual_seed(2)
    x = torch.randn(7, 33, 24, device=DEV, dtype=dtype, requires_grad=True)
    noise = torch.rand(7, 33, device=DEV)
    xm, mask, ids_restore = ops.random_masking(x, 0.75, noise, backend="cuda")
    rxm, rmask, rids = reference.random_masking(x, 0.75, noise)
    assert torch.equal(xm, rxm) and torch.equal(mask, rmask) and torch.equal(ids_restore, rids)
    g = torch.randn_like(xm)
    (gx,) = torch.autograd.grad(xm, x, g)
    (rgx,) = torch.autograd.grad(rxm, x, g)
    assert torch.equal(gx, rgx)


def test_gather_direct_poisoned_buffers(cuda_backend):
    """_C writes every element of its outputs (NaN-filled buffers), zeros where unused."""
    from m3ae_engine import _C
    from m3ae_engine.ops.cuda_backend import _reduce_workspace
    b, li, ki, lt, kt, d, _ = SIZES["odd"]
    plan = make_plan(b, li, ki, 0, 0, seed=3, has_text=False)
    src = plan.enc_row_source
    t = src.numel()
    img = torch.randn(b * li, d, device=DEV)
    g = torch.randn(t, d, device=DEV)
    out = torch.full((t, d), float("nan"), device=DEV)
    stream = torch.cuda.current_stream().cuda_stream
    _C.gather_forward(out.data_ptr(), img.data_ptr(), d, b * li, 0, d, 0, 0, src.data_ptr(), t, d, 0, 0, stream)
    torch.testing.assert_close(out, reference.gather(img.view(b, li, d), None, None, src))
    gi = torch.full((b * li, d), float("nan"), device=DEV)
    gc = torch.full((d,), float("nan"), device=DEV)
    ws = _reduce_workspace(t, 1, d, DEV).fill_(float("nan"))
    _C.gather_backward(g.data_ptr(), t, d, src.data_ptr(), gi.data_ptr(), plan.image_row_of.data_ptr(), b * li,
                       0, 0, 0, gc.data_ptr(), ws.data_ptr(), ws.numel(), 0, 0, stream)
    torch.cuda.synchronize()
    iro = plan.image_row_of.long()
    expect = torch.where((iro >= 0)[:, None], g[iro.clamp_min(0)], 0.0)
    assert torch.equal(gi, expect)
    torch.testing.assert_close(gc, g[src.long() == -1].sum(0))


# ----------------------------------------------------------------------------------------------
# unshuffle
# ----------------------------------------------------------------------------------------------
def _unshuffle_case(be, size, dtype, with_types, with_pos, with_map):
    b, li, ki, lt, kt, _, dd = SIZES[size]
    plan = make_plan(b, li, ki, lt, kt, seed=4)
    torch.manual_seed(5)
    t = plan.enc_row_source.numel()
    vis = torch.randn(t, dd, device=DEV, dtype=dtype, requires_grad=True)
    mt = torch.randn(2, dd, device=DEV, requires_grad=True)
    ty = torch.randn(2, dd, device=DEV, requires_grad=True) if with_types else None
    pos = torch.randn(1 + li + lt, dd, device=DEV) if with_pos else None
    r = plan.dec_row_visible.numel()
    g = torch.randn(r, dd, device=DEV, dtype=dtype)
    poison([r * dd * 4, t * dd * 4])
    out = be.unshuffle(vis, mt, ty, pos, plan.dec_row_visible, plan.dec_row_kind, plan.dec_row_pos,
                       plan.dec_row_of_visible if with_map else None)
    inputs = (vis, mt) + ((ty,) if ty is not None else ())
    poison([t * dd * 4, 4 * dd * 4 * 512])
    grads = torch.autograd.grad(out, inputs, g)
    return out, grads, (vis, mt, ty, pos, plan, g, inputs)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_types,with_pos,with_map", [(True, True, True), (False, False, False),
                                                           (True, False, False)])
def test_unshuffle(cuda_backend, size, dtype, with_types, with_pos, with_map):
    out, grads, (vis, mt, ty, pos, plan, g, inputs) = _unshuffle_case(cuda_backend, size, dtype, with_types,
                                                                      with_pos, with_map)
    ref = reference.unshuffle(vis, mt, ty, pos, plan.dec_row_visible, plan.dec_row_kind, plan.dec_row_pos)
    assert out.dtype == dtype
    # same fp32 additions in the same order as the reference: exact
    assert torch.equal(out, ref.detach()), f"max diff {(out.float() - ref.float()).abs().max().item()}"
    rgrads = torch.autograd.grad(ref, inputs, g)
    assert torch.equal(grads[0], rgrads[0]), "grad_visible is a copy: must be exact"
    for a, r_ in zip(grads[1:], rgrads[1:]):
        assert a.dtype == r_.dtype
        assert_close(a, r_, torch.float32, "mask/type grad", dict(rtol=1e-4, atol=1e-5))
    out2, grads2, _ = _unshuffle_case(cuda_backend, size, dtype, with_types, with_pos, with_map)
    assert torch.equal(out, out2) and all(torch.equal(a, b_) for a, b_ in zip(grads, grads2))
    tb = _triton()
    if tb is not None:
        tout, tgrads, _ = _unshuffle_case(tb, size, dtype, with_types, with_pos, with_map)
        assert_close(out, tout, dtype, "unshuffle vs triton")
        for a, b_ in zip(grads, tgrads):
            assert_close(a, b_, torch.float32, "unshuffle grads vs triton", dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("cls_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unshuffle_mae_dropin(cuda_backend, cls_first, dtype):
    torch.manual_seed(6)
    n, l, k, d = 5, 49, 12, 40
    ids_restore = torch.argsort(torch.argsort(torch.rand(n, l, device=DEV), 1), 1)
    xv = torch.randn(n, k + int(cls_first), d, device=DEV, dtype=dtype, requires_grad=True)
    tok = torch.randn(1, 1, d, device=DEV, dtype=dtype, requires_grad=True)
    out = ops.unshuffle(xv, ids_restore, tok, cls_first, backend="cuda")
    ref = reference.unshuffle_mae(xv, ids_restore, tok, cls_first)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    a = torch.autograd.grad(out, (xv, tok), g)
    r = torch.autograd.grad(ref, (xv, tok), g)
    assert torch.equal(a[0], r[0])
    assert_close(a[1], r[1], dtype, "mask token grad")


# ----------------------------------------------------------------------------------------------
# masked_mse
# ----------------------------------------------------------------------------------------------
MEAN, STD = (0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307)


def _mse_case(be, b, c, h, w, p, lm_frac, dtype, img_kind, norm_pix, seed=7):
    torch.manual_seed(seed)
    if img_kind == "uint8":
        imgs = torch.randint(0, 256, (b, c, h, w), device=DEV, dtype=torch.uint8)
        mean, std = MEAN[:c], STD[:c]
    else:
        imgs = torch.randn(b, c, h, w, device=DEV, dtype=img_kind)
        mean = std = None
    l = (h // p) * (w // p)
    lm = max(1, int(l * lm_frac))
    idx = torch.stack([torch.randperm(l, device=DEV)[:lm].sort().values + i * l for i in range(b)]).reshape(-1)
    idx = idx.to(torch.int32)
    wgt = torch.full((b * lm,), 1.0 / (b * lm), device=DEV)
    pred = torch.randn(b * lm, p * p * c, device=DEV, dtype=dtype, requires_grad=True)
    poison([pred.numel() * 4, b * lm * 4])
    loss = be.masked_mse(pred, imgs, idx, wgt, p, norm_pix, mean, std)
    poison([pred.numel() * 4])
    (gp,) = torch.autograd.grad(loss * 3.0, pred)
    return loss, gp, (pred, imgs, idx, wgt, p, norm_pix, mean, std)


MSE_CASES = {  # b, c, h, w, p, masked fraction
    "odd": (3, 3, 12, 20, 4, 0.6),
    "gray": (2, 1, 15, 10, 5, 0.5),
    "large": (256, 3, 256, 256, 16, 0.75),
}


@pytest.mark.parametrize("case", list(MSE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("img_kind", ["uint8", torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse(cuda_backend, case, dtype, img_kind, norm_pix):
    args = MSE_CASES[case]
    loss, gp, (pred, imgs, idx, wgt, p, npl, mean, std) = _mse_case(cuda_backend, *args, dtype, img_kind, norm_pix)
    ref = reference.masked_mse(pred, imgs, idx, wgt, p, npl, mean, std)
    (rgp,) = torch.autograd.grad(ref * 3.0, pred)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5 if dtype == torch.float32 else 1e-4, atol=1e-6)
    assert gp.dtype == dtype
    assert_close(gp, rgp, dtype, "grad_pred")
    loss2, gp2, _ = _mse_case(cuda_backend, *args, dtype, img_kind, norm_pix)
    assert torch.equal(loss, loss2) and torch.equal(gp, gp2)
    tb = _triton()
    if tb is not None:
        tl, tg, _ = _mse_case(tb, *args, dtype, img_kind, norm_pix)
        torch.testing.assert_close(loss, tl, rtol=1e-5, atol=1e-6)
        assert_close(gp, tg, dtype, "grad_pred vs triton")


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_loss_mae_dropin(cuda_backend, norm_pix):
    torch.manual_seed(8)
    n, p = 4, 8
    imgs = torch.randn(n, 3, 32, 32, device=DEV)
    pred = torch.randn(n, 16, p * p * 3, device=DEV, requires_grad=True)
    mask = (torch.rand(n, 16, device=DEV) > 0.4).float()
    loss = ops.masked_mse_loss(imgs, pred, mask, p, norm_pix, backend="cuda")
    ref = reference.masked_mse_loss(imgs, pred, mask, p, norm_pix)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    a = torch.autograd.grad(loss, pred)[0]
    r = torch.autograd.grad(ref, pred)[0]
    assert_close(a, r, torch.float32, "grad_pred")


# ----------------------------------------------------------------------------------------------
# masked linear cross-entropy
# ----------------------------------------------------------------------------------------------
def _lce_case(be, n, d, v, dtype, with_bias, seed=9, zero_frac=0.1):
    torch.manual_seed(seed)
    h = (torch.randn(n, d, device=DEV) * 2.0).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, device=DEV) / d ** 0.5).requires_grad_(True)
    b = (torch.randn(v, device=DEV) * 0.5).requires_grad_(True) if with_bias else None
    t = torch.randint(0, v, (n,), device=DEV)
    rw = torch.rand(n, device=DEV) / n
    rw[torch.rand(n, device=DEV) < zero_frac] = 0.0  # filler rows
    poison([n * v * 4, n * d * 4, v * d * 4])
    loss, acc = be.linear_cross_entropy(h, w, b, t, rw)
    inputs = (h, w) + ((b,) if b is not None else ())
    grads = torch.autograd.grad(loss * 2.0, inputs)
    return loss, acc, grads, (h, w, b, t, rw, inputs)


LCE_CASES = {  # n, d, v
    "odd": (37, 72, 1001),
    "tiny_vocab": (19, 16, 7),
    "unaligned": (64, 40, 30522),
    "large": (256 * 48, 512, 30522),
}


@pytest.mark.parametrize("case", list(LCE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy(cuda_backend, case, dtype, with_bias, monkeypatch):
    import m3ae_engine.ops.cuda_backend as cb
    n, d, v = LCE_CASES[case]
    if case == "odd":  # force several row chunks
        monkeypatch.setattr(cb, "LCE_CHUNK_BYTES", 5 * v * 4)
    loss, acc, grads, (h, w, b, t, rw, inputs) = _lce_case(cuda_backend, n, d, v, dtype, with_bias)
    rloss, racc = reference.masked_linear_cross_entropy(h, w, b, t, rw)
    rgrads = torch.autograd.grad(rloss * 2.0, inputs)
    assert loss.dtype == torch.float32 and acc.dtype == torch.float32
    torch.testing.assert_close(loss, rloss.detach(), rtol=1e-5 if dtype == torch.float32 else 5e-3, atol=1e-6)
    # accuracy: argmax may flip on near-ties where the logits are rounded differently
    slack = (rw.max() * (3 if dtype == torch.float32 else max(3, n // 50))).item() + 1e-7
    assert abs(acc.item() - racc.item()) <= slack, (acc.item(), racc.item())
    for a, r_ in zip(grads, rgrads):
        assert a.dtype == r_.dtype and a.shape == r_.shape
        assert torch.isfinite(a.float()).all()
        assert rel_err(a, r_) < (2e-5 if dtype == torch.float32 else 1.5e-2), rel_err(a, r_)
    if dtype == torch.float32:
        for a, r_ in zip(grads, rgrads):
            assert_close(a, r_, dtype, "lce grad", dict(rtol=1e-4, atol=1e-5))
    loss2, acc2, grads2, _ = _lce_case(cuda_backend, n, d, v, dtype, with_bias)
    assert torch.equal(loss, loss2) and torch.equal(acc, acc2)
    assert all(torch.equal(a, b_) for a, b_ in zip(grads, grads2))
    tb = _triton()
    if tb is not None:
        tl, ta, tg, _ = _lce_case(tb, n, d, v, dtype, with_bias)
        torch.testing.assert_close(loss, tl, rtol=1e-4 if dtype == torch.float32 else 5e-3, atol=1e-6)
        for a, b_ in zip(grads, tg):
            assert rel_err(a, b_) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_lce_kernel_direct_poisoned(cuda_backend):
    """The softmax kernel overwrites every logit with its gradient, zero rows included."""
    from m3ae_engine import _C
    torch.manual_seed(10)
    n, v = 9, 30522
    for dtype, code in ((torch.float32, 0), (torch.bfloat16, 1)):
        x = torch.randn(n, v, device=DEV).to(dtype)
        bias = torch.randn(v, device=DEV)
        t = torch.randint(0, v, (n,), device=DEV)
        rw = torch.rand(n, device=DEV)
        rw[3] = 0.0
        logits = x.clone()
        rl = torch.full((n,), float("nan"), device=DEV)
        rc = torch.full((n,), float("nan"), device=DEV)
        _C.lce_softmax(logits.data_ptr(), v, code, bias.data_ptr(), t.data_ptr(), rw.data_ptr(), n, v,
                       rl.data_ptr(), rc.data_ptr(), True, 0, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        z = x.float() + bias
        expect = rw[:, None] * (torch.softmax(z, -1) - torch.nn.functional.one_hot(t, v).float())
        assert_close(logits, expect, dtype, "softmax grad")
        assert torch.equal(logits[3].float(), torch.zeros(v, device=DEV))
        ce = torch.logsumexp(z, -1) - z.gather(1, t[:, None]).squeeze(1)
        torch.testing.assert_close(rl, rw * ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rc, rw * (z.argmax(-1) == t).float())


def test_compile_fullgraph(cuda_backend):
    """The custom ops keep torch.compile(fullgraph=True) in one graph."""
    b, li, ki, lt, kt, d, dd = SIZES["odd_vec"]
    img = torch.randn(b, li, d, device=DEV, requires_grad=True)
    cls = torch.randn(d, device=DEV, requires_grad=True)

    def f(img, cls):
        x = ops.gather(img, None, cls, plan.enc_row_source, plan.image_row_of, None, backend="cuda")
        return (x * x).sum()

    plan = make_plan(b, li, ki, 0, 0, seed=11, has_text=False)
    eager = f(img, cls)
    compiled = torch.compile(f, fullgraph=True)(img, cls)
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
    assert img.grad is not None and cls.grad is not None
