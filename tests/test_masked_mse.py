"""Triton fused masked MSE vs m3ae_engine.ops.reference.masked_mse (loss and grad wrt pred)."""
import pytest
import torch

from triton_helpers import DEVICE, close, gpu_launch_config, poisoned_empty

from m3ae_engine import ops
from m3ae_engine.ops import reference
from m3ae_engine.model.config import CC12M_MEAN, CC12M_STD
from m3ae_engine.model.masking import build_plan
from m3ae_engine.kernels.masked_mse import masked_mse, masked_mse_op


def _case(b, size, p, c, dtype, img_kind, seed=0, keep_frac=0.25):
    gen = torch.Generator().manual_seed(seed)
    li = (size // p) ** 2
    plan = build_plan(b, li, max(1, int(li * keep_frac)), None, 0, 0, generator=gen).to(DEVICE)
    if img_kind == "uint8":
        imgs = torch.randint(0, 256, (b, c, size, size), generator=gen, dtype=torch.uint8).to(DEVICE)
    else:
        imgs = torch.randn(b, c, size, size, generator=gen).to(DEVICE, img_kind)
    m = plan.image_patch_index.numel()
    pred = torch.randn(m, p * p * c, generator=gen).to(DEVICE, dtype).requires_grad_()
    return plan, imgs, pred, gen


def _compare(plan, imgs, pred, p, norm_pix, dtype, mean=None, std=None):
    args = (pred, imgs, plan.image_patch_index, plan.image_row_weight, p, norm_pix, mean, std)
    with poisoned_empty():
        loss = masked_mse(*args)
    ref = reference.masked_mse(*args)
    assert loss.dtype == torch.float32 and loss.shape == ()
    close(loss, ref, dtype, what="loss")
    with poisoned_empty():
        (g,) = torch.autograd.grad(loss * 3.0, pred)
    (g_ref,) = torch.autograd.grad(ref * 3.0, pred)
    assert g.dtype == pred.dtype
    close(g, g_ref, dtype, scale=1e-2, what="grad pred")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_uint8(dtype, norm_pix):
    mean, std = (CC12M_MEAN, CC12M_STD)
    plan, imgs, pred, _ = _case(3, 24, 8, 3, dtype, "uint8", seed=1)
    _compare(plan, imgs, pred, 8, norm_pix, dtype, mean, std)


@pytest.mark.parametrize("img_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 20, 4, 3), (5, 15, 5, 1)])  # odd sizes, one channel
def test_masked_mse_float_images(img_dtype, shape):
    b, size, p, c = shape
    plan, imgs, pred, _ = _case(b, size, p, c, torch.float32, img_dtype, seed=2)
    for norm_pix in (False, True):
        _compare(plan, imgs, pred, p, norm_pix, torch.float32)


def test_masked_mse_arbitrary_rows_and_weights():
    # rows may repeat, come in any order and carry any weight (zero for fillers)
    gen = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, 12, 12, generator=gen).to(DEVICE)
    idx = torch.tensor([7, 0, 15, 7, 3], dtype=torch.int32, device=DEVICE)
    w = torch.tensor([0.5, 0.0, 2.0, -1.0, 0.25], device=DEVICE)
    pred = torch.randn(5, 48, generator=gen).to(DEVICE).requires_grad_()
    loss = masked_mse(pred, imgs, idx, w, 4, True)
    ref = reference.masked_mse(pred, imgs, idx, w, 4, True)
    close(loss, ref)
    close(torch.autograd.grad(loss, pred)[0], torch.autograd.grad(ref, pred)[0])


def test_masked_mse_bad_input():
    imgs = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8, device=DEVICE)
    pred = torch.randn(3, 48, device=DEVICE)
    idx = torch.tensor([0, 1, 8], dtype=torch.int32, device=DEVICE)
    w = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="patch_index must lie in"):
        masked_mse(pred, imgs, idx, w, 4, False, CC12M_MEAN, CC12M_STD)
    with pytest.raises(ValueError, match="uint8 images need mean and std"):
        masked_mse(pred, imgs, idx.clamp_max(7), w, 4)
    with pytest.raises(ValueError, match="pred must be"):
        masked_mse(pred[:, :40], imgs, idx, w, 4, False, CC12M_MEAN, CC12M_STD)
    with pytest.raises(ValueError, match="not divisible"):
        masked_mse(pred, imgs, idx, w, 3, False, CC12M_MEAN, CC12M_STD)
    with pytest.raises(ValueError, match="row_weight"):
        masked_mse(pred, imgs, idx, w[:2], 4, False, CC12M_MEAN, CC12M_STD)


def test_masked_mse_opcheck():
    plan, imgs, pred, _ = _case(2, 8, 4, 3, torch.float32, "uint8", seed=4)
    stats = torch.tensor([CC12M_MEAN, CC12M_STD], device=DEVICE)
    torch.library.opcheck(masked_mse_op, (pred, imgs, plan.image_patch_index, plan.image_row_weight, stats, 4, True))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_loss_dropin_matches_torch(norm_pix):
    gen = torch.Generator().manual_seed(5)
    n, size, p = 3, 20, 4
    imgs = torch.randn(n, 3, size, size, generator=gen).to(DEVICE)
    pred = torch.randn(n, (size // p) ** 2, p * p * 3, generator=gen).to(DEVICE).requires_grad_()
    mask = (torch.rand(n, (size // p) ** 2, generator=gen) > 0.4).float().to(DEVICE)
    a = ops.masked_mse_loss(imgs, pred, mask, p, norm_pix, backend="triton")
    b = ops.masked_mse_loss(imgs, pred, mask, p, norm_pix, backend="torch")
    mae = reference.masked_mse_loss(imgs, pred, mask, p, norm_pix)
    close(a, b)
    close(a, mae)
    close(torch.autograd.grad(a, pred)[0], torch.autograd.grad(mae, pred)[0])


def test_masked_mse_gpu_launch_config():
    plan, imgs, pred, _ = _case(2, 12, 4, 3, torch.float32, "uint8", seed=7)
    with gpu_launch_config():
        _compare(plan, imgs, pred, 4, True, torch.float32, CC12M_MEAN, CC12M_STD)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_gpu_large(dtype, norm_pix):
    # B=256 images of 256 px, patch 16, 75% masked (M = 256 * 192 rows of 768)
    plan, imgs, pred, _ = _case(256, 256, 16, 3, dtype, "uint8", seed=6)
    _compare(plan, imgs, pred, 16, norm_pix, dtype, CC12M_MEAN, CC12M_STD)


def test_masked_mse_backward_opcheck():
    from m3ae_engine.kernels.masked_mse import masked_mse_backward_op
    plan, imgs, pred, _ = _case(2, 8, 4, 3, torch.float32, "uint8", seed=8)
    stats = torch.tensor([CC12M_MEAN, CC12M_STD], device=DEVICE)
    torch.library.opcheck(masked_mse_backward_op, (torch.tensor(0.5, device=DEVICE), pred.detach(), imgs,
                                                   plan.image_patch_index, plan.image_row_weight, stats, 4, False))
