"""Triton fused linear cross-entropy vs m3ae_engine.ops.reference.masked_linear_cross_entropy."""
import pytest
import torch

from triton_helpers import DEVICE, close, close_norm, gpu_launch_config, poisoned_empty

from m3ae_engine import ops
from m3ae_engine.ops import reference
from m3ae_engine.kernels.masked_linear_cross_entropy import linear_cross_entropy_op, masked_linear_cross_entropy


def _case(n, d, v, dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=gen) / d ** 0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(v, generator=gen).to(DEVICE, dtype).requires_grad_() if bias else None
    with torch.no_grad():
        logits = torch.nn.functional.linear(h.float(), w.float(), None if b is None else b.float())
    t = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    hit = torch.rand(n, generator=gen).to(DEVICE) < 0.5  # half the rows predict their target
    t = torch.where(hit, logits.argmax(-1), t)
    rw = torch.rand(n, generator=gen).to(DEVICE)
    rw[::5] = 0.0  # filler rows
    return h, w, b, t, rw, gen


def _compare(h, w, b, t, rw, dtype, chunk_rows=0, check_acc=True):
    with poisoned_empty():
        loss, acc = masked_linear_cross_entropy(h, w, b, t, rw, chunk_rows=chunk_rows)
    ref, ref_acc = reference.masked_linear_cross_entropy(h, w, b, t, rw)
    assert loss.dtype == torch.float32 and loss.shape == () and not acc.requires_grad
    close(loss, ref, dtype, scale=10.0, what="loss")
    if check_acc:
        close(acc, ref_acc, what="accuracy")
    leaves = [x for x in (h, w, b) if x is not None]
    with poisoned_empty():
        got = torch.autograd.grad(loss * 0.7, leaves)
    want = torch.autograd.grad(ref * 0.7, leaves)
    for name, a, e in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == e.dtype and a.shape == e.shape
        if h.shape[0] > 4096:  # thousands of rows summed into each weight-grad entry: norm-wise check
            close_norm(a, e, dtype, what=f"grad {name}")
        else:
            close(a, e, dtype, what=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lce_chunked(dtype):
    h, w, b, t, rw, _ = _case(37, 19, 101, dtype, seed=1)
    _compare(h, w, b, t, rw, dtype, chunk_rows=8, check_acc=dtype == torch.float32)  # 5 chunks, last partial


@pytest.mark.parametrize("chunk_rows", [0, 1, 64])
def test_lce_chunk_sizes_no_bias(chunk_rows):
    h, w, b, t, rw, _ = _case(23, 8, 77, torch.float32, seed=2, bias=False)
    _compare(h, w, b, t, rw, torch.float32, chunk_rows=chunk_rows)


def test_lce_ties_pick_first_max_and_frozen_weight():
    # equal logits: torch.argmax picks the first maximum; the kernel must too
    w = torch.zeros(9, 4, device=DEVICE)
    h = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    t = torch.tensor([0, 3, 8], device=DEVICE)
    rw = torch.ones(3, device=DEVICE)
    loss, acc = masked_linear_cross_entropy(h, w, None, t, rw)
    ref, ref_acc = reference.masked_linear_cross_entropy(h, w, None, t, rw)
    close(loss, ref)
    assert acc.item() == ref_acc.item() == 1.0
    close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(ref, h)[0])  # weight frozen: only grad_hidden


def test_lce_no_grad_mode():
    h, w, b, t, rw, _ = _case(9, 8, 33, torch.float32, seed=3)
    with torch.no_grad():
        loss, acc = masked_linear_cross_entropy(h, w, b, t, rw)
    close(loss, reference.masked_linear_cross_entropy(h, w, b, t, rw)[0])
    assert not loss.requires_grad


def test_lce_bad_input():
    h, w, b, t, rw, _ = _case(4, 8, 10, torch.float32, seed=4)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        masked_linear_cross_entropy(h, w, b, t + 10, rw)
    with pytest.raises(ValueError, match="weight must be"):
        masked_linear_cross_entropy(h, w[:, :5], b, t, rw)
    with pytest.raises(ValueError, match="bias must be"):
        masked_linear_cross_entropy(h, w, b[:3], t, rw)
    with pytest.raises(ValueError, match="targets must have 4"):
        masked_linear_cross_entropy(h, w, b, t[:2], rw)
    with pytest.raises(ValueError, match="weight is torch.bfloat16"):
        masked_linear_cross_entropy(h, w.bfloat16(), b, t, rw)


def test_lce_opcheck():
    h, w, b, t, rw, _ = _case(6, 8, 20, torch.float32, seed=5)
    torch.library.opcheck(linear_cross_entropy_op, (h, w, b, t, rw, True, True, True, 4))


def test_official_text_loss_dropin_matches_torch():
    gen = torch.Generator().manual_seed(6)
    bsz, l, d, v = 3, 7, 8, 50
    h = torch.randn(bsz, l, d, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(v, d, generator=gen).to(DEVICE).requires_grad_()
    b = torch.randn(v, generator=gen).to(DEVICE).requires_grad_()
    t = torch.randint(0, v, (bsz, l), generator=gen).to(DEVICE)
    valid = (torch.rand(bsz, l, generator=gen) > 0.4).float().to(DEVICE)
    valid[0] = 0  # a sample without masked tokens: count clamps to 1e-5
    a = ops.masked_linear_cross_entropy(h, w, b, t, valid, backend="triton")
    c = ops.masked_linear_cross_entropy(h, w, b, t, valid, backend="torch")
    official = reference.masked_linear_cross_entropy_official(h, w, b, t, valid)
    for x, y, z in zip(a, c, official):
        close(x, y)
        close(x, z)
    for x, y in zip(torch.autograd.grad(a[0], (h, w, b)), torch.autograd.grad(official[0], (h, w, b))):
        close(x, y)


def test_lce_gpu_launch_config():
    # one row a program and 4096-wide V blocks (V > 4096: several blocks a row, a partial last one)
    h, w, b, t, rw, _ = _case(5, 8, 4100, torch.float32, seed=7)
    with gpu_launch_config():
        _compare(h, w, b, t, rw, torch.float32, chunk_rows=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lce_gpu_large(dtype):
    # M3AE text head: B=256, Lt=64 with 75% masked (~48 rows a sample, ~12k rows), Dd=512, V=30522
    h, w, b, t, rw, _ = _case(256 * 48, 512, 30522, dtype, seed=7)
    _compare(h, w, b, t, rw, dtype, check_acc=dtype == torch.float32)
