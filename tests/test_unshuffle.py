"""Triton fused unshuffle vs m3ae_engine.ops.reference.unshuffle (forward and every gradient)."""
import pytest
import torch

from triton_helpers import DEVICE, close, close_norm, gpu_launch_config, poisoned_empty, text_padding

from m3ae_engine import ops
from m3ae_engine.ops import reference
from m3ae_engine.model.masking import build_plan
from m3ae_engine.kernels.unshuffle import unshuffle, unshuffle_op


def _case(b, li, lt, d, dtype, packed, has_image=True, has_text=True, seed=0, types=True):
    gen = torch.Generator().manual_seed(seed)
    pad = text_padding(b, lt, gen) if has_text else None
    plan = build_plan(b, li, max(1, li // 4) if has_image else 0, pad, lt, max(1, lt // 4), has_image=has_image,
                      packed=packed, generator=gen).to(DEVICE)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    vis = mk(plan.enc.rows, d)
    mask_tokens = mk(2, d)
    type_emb = mk(2, d) if types else None
    # any fixed table works for the kernel (the model's is sin-cos, which needs D % 4 == 0)
    pos = torch.randn((li if has_image else 0) + (lt if has_text else 0), d, generator=gen).to(DEVICE, dtype)
    return plan, vis, mask_tokens, type_emb, pos, gen


def _compare(plan, vis, mask_tokens, type_emb, pos, dtype, gen, pass_inverse=True):
    args = (vis, mask_tokens, type_emb, pos, plan.dec_row_visible, plan.dec_row_kind, plan.dec_row_pos)
    with poisoned_empty():
        out = unshuffle(*args, plan.dec_row_of_visible if pass_inverse else None)
    ref = reference.unshuffle(*args)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    close(out, ref, dtype, what="forward")
    g = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    leaves = [x for x in (vis, mask_tokens, type_emb) if x is not None]
    with poisoned_empty():
        got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for name, a, b_ in zip(("visible", "mask_tokens", "type"), got, want):
        assert a.dtype == b_.dtype
        if name != "visible" and out.shape[0] > 4096:  # sums over thousands of rows: norm-wise check
            close_norm(a, b_, dtype, what=f"grad {name}")
        else:
            close(a, b_, dtype, scale=4.0, what=f"grad {name}")  # kind sums add up many rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [True, False])
def test_unshuffle_paired(dtype, packed):
    plan, vis, mt, te, pos, gen = _case(3, 9, 7, 37, dtype, packed, seed=1)
    _compare(plan, vis, mt, te, pos, dtype, gen)


@pytest.mark.parametrize("mode", ["image", "text", "no_types", "no_inverse"])
def test_unshuffle_variants(mode):
    plan, vis, mt, te, pos, gen = _case(5, 16, 11, 24, torch.float32, True, has_image=mode != "text",
                                        has_text=mode != "image", seed=2, types=mode != "no_types")
    _compare(plan, vis, mt, te, pos, torch.float32, gen, pass_inverse=mode != "no_inverse")


def test_unshuffle_bad_input():
    vis = torch.randn(4, 8, device=DEVICE)
    mt = torch.randn(2, 8, device=DEVICE)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match="row_visible must lie in"):
        unshuffle(vis, mt, None, None, i32(0, 4), i32(0, 0), i32(0, 0))
    with pytest.raises(ValueError, match="row_kind must lie in"):
        unshuffle(vis, mt, None, None, i32(0, 1), i32(0, 5), i32(0, 0))
    with pytest.raises(ValueError, match="row_pos"):
        unshuffle(vis, mt, None, torch.zeros(3, 8, device=DEVICE), i32(0, 1), i32(0, 1), i32(0, 3))
    with pytest.raises(ValueError, match="mask_tokens must be"):
        unshuffle(vis, mt[:1], None, None, i32(0), i32(0), i32(0))
    with pytest.raises(ValueError, match="row_kind must have 2"):
        unshuffle(vis, mt, None, None, i32(0, 1), i32(0), i32(0, 0))


def test_unshuffle_opcheck():
    plan, vis, mt, te, pos, _ = _case(2, 4, 5, 6, torch.float32, True, seed=4)
    torch.library.opcheck(unshuffle_op, (vis, mt, te, pos, plan.dec_row_visible, plan.dec_row_kind,
                                         plan.dec_row_pos, plan.dec_row_of_visible))


@pytest.mark.parametrize("cls_first", [False, True])
def test_unshuffle_mae_dropin_matches_torch(cls_first):
    gen = torch.Generator().manual_seed(5)
    n, l, k, d = 3, 13, 4, 9
    x = torch.randn(n, k + int(cls_first), d, generator=gen).to(DEVICE).requires_grad_()
    mask_token = torch.randn(1, 1, d, generator=gen).to(DEVICE).requires_grad_()
    ids_restore = torch.argsort(torch.argsort(torch.rand(n, l, generator=gen), 1), 1).to(DEVICE)
    a = ops.unshuffle(x, ids_restore, mask_token, cls_first, backend="triton")
    b = ops.unshuffle(x, ids_restore, mask_token, cls_first, backend="torch")
    mae = reference.unshuffle_mae(x, ids_restore, mask_token, cls_first)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, mae)
    g = torch.randn(a.shape, generator=gen).to(DEVICE)
    for u, v in zip(torch.autograd.grad(a, (x, mask_token), g), torch.autograd.grad(mae, (x, mask_token), g)):
        torch.testing.assert_close(u, v)


def test_unshuffle_gpu_launch_config():
    plan, vis, mt, te, pos, gen = _case(3, 9, 7, 600, torch.float32, True, seed=7)  # 4 rows a program
    with gpu_launch_config():
        _compare(plan, vis, mt, te, pos, torch.float32, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unshuffle_gpu_large(dtype):
    # M3AE-large decoder input: B=256, Dd=512, Li=256 (Ki=64), Lt=64 (Kt=16)
    plan, vis, mt, te, pos, gen = _case(256, 256, 64, 512, dtype, True, seed=6)
    _compare(plan, vis, mt, te, pos, dtype, gen)


def test_unshuffle_backward_opcheck():
    from m3ae_engine.kernels.unshuffle import unshuffle_backward_op
    plan, vis, mt, te, pos, gen = _case(2, 4, 5, 6, torch.float32, True, seed=8)
    g = torch.randn(plan.dec.rows, 6, generator=gen).to(DEVICE)
    for need_mask, need_type in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(unshuffle_backward_op, (g, plan.dec_row_visible, plan.dec_row_kind,
                                                      plan.dec_row_of_visible, need_mask, need_type))
