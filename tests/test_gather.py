"""Triton fused masking gather vs m3ae_engine.ops.reference.gather (forward and every gradient)."""
import pytest
import torch

from triton_helpers import DEVICE, close, gpu_launch_config, poisoned_empty, text_padding

from m3ae_engine import ops
from m3ae_engine.ops import reference
from m3ae_engine.model.masking import build_plan
from m3ae_engine.kernels.gather import gather, gather_op


def _inputs(b, li, lt, d, dtype, packed, has_image=True, has_text=True, seed=0, sharing="sample"):
    gen = torch.Generator().manual_seed(seed)
    pad = text_padding(b, lt, gen) if has_text else None
    plan = build_plan(b, li, max(1, li // 4) if has_image else 0, pad, lt, max(1, lt // 4), has_image=has_image,
                      packed=packed, sharing=sharing, generator=gen).to(DEVICE)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    img = mk(b, li, d) if has_image else None
    txt = mk(b, lt, d) if has_text else None
    cls = mk(d)
    return plan, img, txt, cls, gen


def _compare(plan, img, txt, cls, dtype, gen, pass_inverse=True):
    args = (img, txt, cls, plan.enc_row_source)
    with poisoned_empty():
        out = gather(*args, plan.image_row_of if pass_inverse else None, plan.text_row_of if pass_inverse else None)
    ref = reference.gather(*args)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    close(out, ref, dtype, what="forward")
    g = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    leaves = [x for x in (img, txt, cls) if x is not None]
    with poisoned_empty():
        got = torch.autograd.grad(out, leaves, g)
    # the oracle accumulates in fp32 (the torch reference's bf16 index_put accumulation is itself
    # off by more than the tolerance when 256 CLS rows are summed)
    leaves32 = [x.detach().float().requires_grad_() for x in leaves]
    it = iter(leaves32)
    args32 = [next(it) if x is not None else None for x in (img, txt, cls)]
    ref32 = reference.gather(*args32, plan.enc_row_source)
    want = torch.autograd.grad(ref32, leaves32, g.float())
    for a, b_, leaf in zip(got, want, leaves):
        assert a.dtype == leaf.dtype
        close(a, b_, dtype, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [True, False])
def test_gather_paired(dtype, packed):
    plan, img, txt, cls, gen = _inputs(3, 9, 7, 37, dtype, packed, seed=1)
    _compare(plan, img, txt, cls, dtype, gen)


@pytest.mark.parametrize("mode", ["image", "text", "batch_shared", "no_inverse"])
def test_gather_variants(mode):
    plan, img, txt, cls, gen = _inputs(5, 16, 11, 20, torch.float32, True, has_image=mode != "text",
                                       has_text=mode != "image", seed=2,
                                       sharing="batch" if mode == "batch_shared" else "sample")
    _compare(plan, img, txt, cls, torch.float32, gen, pass_inverse=mode != "no_inverse")


def test_gather_no_cls_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(2, 5, 13, generator=gen).to(DEVICE).requires_grad_()
    txt = torch.randn(2, 3, 13, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    src = torch.tensor([-1, 0, 4, -2, 10, 12, 7, -1], dtype=torch.int32, device=DEVICE)
    out = gather(img, txt, None, src)
    ref = reference.gather(img, txt, None, src)
    close(out, ref)
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    for a, b in zip(torch.autograd.grad(out, (img, txt), g), torch.autograd.grad(ref, (img, txt), g)):
        assert a.dtype == b.dtype
        close(a, b, b.dtype)


def test_gather_bad_input():
    img = torch.randn(2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="row_source must lie in"):
        gather(img, None, None, torch.tensor([0, 8], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="must be int32 or int64"):
        gather(img, None, None, torch.tensor([0.0], device=DEVICE))
    with pytest.raises(ValueError, match="text_tokens must be"):
        gather(img, torch.randn(2, 4, 7, device=DEVICE), None, torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="cls must have 8"):
        gather(img, None, torch.randn(7, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="image_row_of must have 8"):
        gather(img, None, None, torch.zeros(1, dtype=torch.int32, device=DEVICE),
               torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        gather(img.double(), None, None, torch.zeros(1, dtype=torch.int32, device=DEVICE))


def test_gather_opcheck():
    plan, img, txt, cls, _ = _inputs(2, 4, 5, 6, torch.float32, True, seed=4)
    torch.library.opcheck(gather_op, (img, txt, cls, plan.enc_row_source, plan.image_row_of, plan.text_row_of))


def test_random_masking_dropin_matches_torch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 17, 10, generator=gen).to(DEVICE).requires_grad_()
    noise = torch.rand(3, 17, generator=gen).to(DEVICE)
    a = ops.random_masking(x, 0.6, noise, backend="triton")
    b = ops.random_masking(x, 0.6, noise, backend="torch")
    mae = reference.random_masking(x, 0.6, noise)
    for u, v, w in zip(a, b, mae):
        torch.testing.assert_close(u, v)
        torch.testing.assert_close(u, w)
    g = torch.randn(a[0].shape, generator=gen).to(DEVICE)
    torch.testing.assert_close(torch.autograd.grad(a[0], x, g)[0], torch.autograd.grad(b[0], x, g)[0])


def test_gather_gpu_launch_config():
    plan, img, txt, cls, gen = _inputs(3, 9, 7, 600, torch.float32, True, seed=7)  # 4 rows a program
    with gpu_launch_config():
        _compare(plan, img, txt, cls, torch.float32, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_gpu_large(dtype):
    # M3AE-large encoder: B=256, D=1024, Li=256 (Ki=64), Lt=64 (Kt=16)
    plan, img, txt, cls, gen = _inputs(256, 256, 64, 1024, dtype, True, seed=6)
    _compare(plan, img, txt, cls, dtype, gen)


def test_gather_backward_opcheck_and_device_error():
    from m3ae_engine.kernels.gather import gather_backward_op
    plan, img, txt, cls, gen = _inputs(2, 4, 5, 6, torch.float32, True, seed=8)
    g = torch.randn(plan.enc.rows, 6, generator=gen).to(DEVICE)
    torch.library.opcheck(gather_backward_op, (g, plan.enc_row_source, plan.image_row_of, plan.text_row_of, True))
    with pytest.raises(ValueError, match="row_source is on meta"):
        gather(img, txt, cls, plan.enc_row_source.to("meta"))
