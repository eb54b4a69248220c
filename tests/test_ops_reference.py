"""The four public ops (torch backend) against independent brute-force computations written with
MAE's and the official M3AE code's formulas."""
import math

import pytest
import torch

from m3ae_engine import ops
from m3ae_engine.ops import reference


def test_random_masking_is_maes_contract():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 5)
    noise = torch.rand(3, 10)
    xm, mask, ids_restore = ops.random_masking(x, 0.6, noise)
    k = int(10 * 0.4)
    for n in range(3):
        order = sorted(range(10), key=lambda i: noise[n, i].item())
        kept = order[:k]
        assert torch.equal(xm[n], x[n, kept])
        for i in range(10):
            assert mask[n, i] == (0.0 if i in kept else 1.0)
            assert ids_restore[n, i] == order.index(i)
    assert mask.dtype == torch.float32
    ref = reference.random_masking(x, 0.6, noise)
    for a, b in zip((xm, mask, ids_restore), ref):
        assert torch.equal(a, b)


def test_random_masking_gradient_scatters_back():
    x = torch.randn(2, 8, 3, requires_grad=True)
    noise = torch.rand(2, 8)
    xm, mask, _ = ops.random_masking(x, 0.5, noise)
    g = torch.randn_like(xm)
    xm.backward(g)
    expect = torch.zeros_like(x)
    ids_keep = torch.argsort(noise, 1)[:, :4]
    for n in range(2):
        for j, i in enumerate(ids_keep[n]):
            expect[n, i] = g[n, j]
    assert torch.equal(x.grad, expect)


@pytest.mark.parametrize("cls_first", [False, True])
def test_unshuffle_is_maes_append_and_gather(cls_first):
    torch.manual_seed(1)
    n, l, k, d = 3, 9, 4, 6
    noise = torch.rand(n, l)
    ids_restore = torch.argsort(torch.argsort(noise, 1), 1)
    xv = torch.randn(n, k + int(cls_first), d, requires_grad=True)
    tok = torch.randn(1, 1, d, requires_grad=True)
    out = ops.unshuffle(xv, ids_restore, tok, cls_first=cls_first)
    # brute force: position i holds visible token ids_restore[i] if it is < k, else the mask token
    off = int(cls_first)
    for b in range(n):
        if cls_first:
            assert torch.equal(out[b, 0], xv[b, 0])
        for i in range(l):
            r = ids_restore[b, i]
            want = xv[b, off + r] if r < k else tok.reshape(d)
            assert torch.allclose(out[b, off + i], want)
    g = torch.randn_like(out)
    out.backward(g)
    n_masked = (ids_restore >= k)
    assert torch.allclose(tok.grad.reshape(d), g[:, off:][n_masked].sum(0), atol=1e-6)
    assert torch.allclose(out, reference.unshuffle_mae(xv, ids_restore, tok, cls_first))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_loss_is_maes_forward_loss(norm_pix):
    torch.manual_seed(2)
    n, p, c, h = 2, 4, 3, 8
    imgs = torch.randn(n, c, h, h)
    L = (h // p) ** 2
    pred = torch.randn(n, L, p * p * c)
    mask = (torch.rand(n, L) > 0.5).float()
    mask[0, 0] = 1.0
    loss = ops.masked_mse_loss(imgs, pred, mask, p, norm_pix)
    # brute force: explicit (p, p, c) patch extraction
    total, count = 0.0, 0.0
    for b in range(n):
        for gi in range(h // p):
            for gj in range(h // p):
                idx = gi * (h // p) + gj
                patch = imgs[b, :, gi * p:(gi + 1) * p, gj * p:(gj + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    patch = (patch - patch.mean()) / math.sqrt(patch.var().item() + 1e-6)
                total += mask[b, idx] * ((pred[b, idx] - patch) ** 2).mean()
                count += mask[b, idx]
    assert torch.allclose(loss, total / count, rtol=1e-5)


def test_masked_mse_reads_uint8_with_mean_std():
    torch.manual_seed(3)
    imgs = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pred = torch.randn(8, 48)
    index = torch.arange(8, dtype=torch.int32)
    w = torch.full((8,), 1 / 8)
    got = ops.masked_mse(pred, imgs, index, w, 4, False, mean, std, backend="torch")
    norm = (imgs.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    want = ops.masked_mse_loss(norm, pred.view(2, 4, 48), torch.ones(2, 4), 4)
    assert torch.allclose(got, want, rtol=1e-5)


def test_masked_linear_cross_entropy_is_the_official_loss():
    torch.manual_seed(4)
    b, l, d, v = 3, 7, 5, 11
    h = torch.randn(b, l, d)
    w = torch.randn(v, d)
    bias = torch.randn(v)
    t = torch.randint(0, v, (b, l))
    valid = (torch.rand(b, l) > 0.4).float()
    valid[2] = 0  # a sample with no valid token contributes 0 (count clamped to 1e-5)
    loss, acc = ops.masked_linear_cross_entropy(h, w, bias, t, valid)
    # brute force, the official cross_entropy_loss_and_accuracy
    per, per_acc = [], []
    for i in range(b):
        s, a = 0.0, 0.0
        for j in range(l):
            if valid[i, j] > 0:
                logits = h[i, j] @ w.T + bias
                s += -(torch.log_softmax(logits, -1)[t[i, j]])
                a += float(logits.argmax() == t[i, j])
        cnt = max(valid[i].sum().item(), 1e-5)
        per.append(s / cnt)
        per_acc.append(a / cnt)
    assert torch.allclose(loss, torch.stack([torch.as_tensor(x) for x in per]).mean(), rtol=1e-5)
    assert abs(acc.item() - sum(per_acc) / b) < 1e-6
    ref_loss, ref_acc = reference.masked_linear_cross_entropy_official(h, w, bias, t, valid)
    assert torch.allclose(loss, ref_loss, rtol=1e-5) and torch.allclose(acc, ref_acc)


def test_clear_errors_on_bad_shapes():
    with pytest.raises(ValueError, match="x must be"):
        ops.random_masking(torch.randn(3, 4), 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.random_masking(torch.randn(1, 3, 4), 1.5)
    with pytest.raises(ValueError, match="pred must be"):
        ops.masked_mse_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 10), torch.ones(2, 4), 4)
    with pytest.raises(ValueError, match="weight must be"):
        ops.masked_linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 6), None,
                                        torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.resolve_backend("opencl")


def test_backend_availability_is_reported():
    avail = ops.available_backends()
    assert avail["torch"] == "available"
    assert set(avail) == {"cuda", "triton", "torch"}
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"
