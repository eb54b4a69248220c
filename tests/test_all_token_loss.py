"""image_all_token_loss / text_all_token_loss: the official flags (m3ae_main.py, mae_main.py) on every
kernel backend, packed and padded, paired, image-only (MAE) and text-only forwards.

The official losses (official_m3ae.py, transcribed) run on the engine model's padded decoder output with
the heads applied to ALL positions; the engine computes the heads only on the plan's loss rows.
The CUDA backend runs its Python wrappers over the CPU emulation of `_C` (test_cuda_wrappers_emulated).
"""
import pytest
import torch

from official_m3ae import batch, check_against_official, engine_and_reference, with_fields
from test_cuda_wrappers_emulated import emulated  # noqa: F401  (fixture)

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.model.masking import build_plan


# ---------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("exact", [True, False])
def test_plan_rows_cover_every_token(packed, exact):
    b, li, ki, lt, kt = 3, 9, 2, 7, 3
    lengths = torch.tensor([1, 7, 4])
    pad = (torch.arange(lt)[None] >= lengths[:, None]).float()
    plan = build_plan(b, li, ki, pad, lt, kt, packed=packed, generator=torch.Generator().manual_seed(0),
                      exact_sizes=exact, image_all_tokens=True, text_all_tokens=True)
    # pixels: every patch of every image, weight 1 / (B * Li) (patch_mse_loss without a mask)
    assert torch.equal(plan.image_patch_index.long(), torch.arange(b * li))
    assert torch.allclose(plan.image_row_weight, torch.full((b * li,), 1.0 / (b * li)))
    assert torch.equal(plan.dec_row_kind[plan.image_pred_rows], torch.zeros(b * li, dtype=torch.int32))
    assert torch.equal(plan.dec_row_pos[plan.image_pred_rows].long(), torch.arange(li).repeat(b))
    # words: every non-padded token once, weight 1 / (B * length) (official per-sample mean, batch mean)
    w = plan.text_row_weight
    live = w > 0
    tgt = plan.text_target_index[live]
    assert sorted(tgt.tolist()) == [i * lt + j for i in range(b) for j in range(int(lengths[i]))]
    want_w = 1.0 / (b * lengths[tgt // lt].float())
    torch.testing.assert_close(w[live], want_w)
    rows = plan.text_pred_rows[live]
    assert torch.equal(plan.dec_row_kind[rows], torch.ones_like(rows, dtype=torch.int32))
    assert torch.equal(plan.dec_row_pos[rows].long() - li, tgt % lt)  # the row decodes that very position
    if not exact and packed:
        assert w.numel() == b * lt and not w[~live].any()  # capacity layout: filler rows weigh 0


def test_plan_default_rows_are_the_masked_ones():
    pad = torch.zeros(2, 6)
    plan = build_plan(2, 9, 3, pad, 6, 2, generator=torch.Generator().manual_seed(0))
    assert plan.image_patch_index.numel() == 2 * 6 and plan.text_target_index.numel() == 2 * 4
    masked = plan.image_mask.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(plan.image_patch_index.long().sort().values, masked)


# ---------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_paired_all_token_losses_match_official(backend, emulated, monkeypatch):  # noqa: F811
    ref, model = engine_and_reference(dict(image_all_token_loss=True, text_all_token_loss=True), backend, emulated, monkeypatch)
    image, text, pad = batch(ref.config, 3, torch.Generator().manual_seed(1))
    out = check_against_official(ref, model, image, text, pad, 3)
    assert out.image_prediction.shape == (3, ref.config.num_patches, ref.config.patch_dim)
    assert torch.equal(out.image_masked_positions, torch.arange(ref.config.num_patches).expand(3, -1))


@pytest.mark.parametrize("flags", [(True, False), (False, True), (False, False)])
def test_each_flag_alone_matches_official(flags, emulated, monkeypatch):  # noqa: F811
    ref, model = engine_and_reference(dict(image_all_token_loss=flags[0], text_all_token_loss=flags[1]), "torch", emulated,
                         monkeypatch)
    image, text, pad = batch(ref.config, 3, torch.Generator().manual_seed(4))
    check_against_official(ref, model, image, text, pad, 3, seed=5)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_mae_image_only_all_token_loss_matches_official(backend, emulated, monkeypatch):  # noqa: F811
    """mae_main.py: patch_mse_loss(output, patches, None if image_all_token_loss else mask); with MAE's
    norm_pix_loss target."""
    ref, model = engine_and_reference(dict(image_all_token_loss=True, norm_pix_loss=True), backend, emulated, monkeypatch)
    image, _, _ = batch(ref.config, 2, torch.Generator().manual_seed(6), with_text=False)
    out = check_against_official(ref, model, image, None, None, 2)
    assert out.text_loss is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_text_only_all_token_loss_matches_official(backend, emulated, monkeypatch):  # noqa: F811
    """The unpaired text forward uses the same flag (m3ae_main.py)."""
    ref, model = engine_and_reference(dict(text_all_token_loss=True), backend, emulated, monkeypatch)
    _, text, pad = batch(ref.config, 3, torch.Generator().manual_seed(7), with_image=False)
    check_against_official(ref, model, None, text, pad, 3)


def test_all_token_loss_differs_from_masked_loss():
    """The flags change the loss (guards against a plan that ignores them)."""
    torch.manual_seed(0)
    c = M3AEConfig.from_preset("tiny", kernels="torch")
    m = M3AE(c)
    image, text, pad = batch(c, 3, torch.Generator().manual_seed(1))
    masked = m(image, text, pad, generator=torch.Generator().manual_seed(3))
    m.config = with_fields(c, image_all_token_loss=True, text_all_token_loss=True)
    every = m(image, text, pad, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(masked.image_loss, every.image_loss)
    assert not torch.allclose(masked.text_loss, every.text_loss)
    assert int((every.text_row_weight > 0).sum()) == int((1 - pad).sum())


def test_flops_count_the_all_token_head_rows():
    from m3ae_engine.model.flops import m3ae_flops
    c = M3AEConfig.from_preset("tiny")
    lengths = torch.tensor([5.0, 32.0])
    base = m3ae_flops(c, lengths, kept_text=torch.tensor([2.0, 8.0]), training=False, breakdown=True)
    every = m3ae_flops(with_fields(c, image_all_token_loss=True, text_all_token_loss=True), lengths,
                       kept_text=torch.tensor([2.0, 8.0]), training=False, breakdown=True)
    dd, p, v = c.dec_emb_dim, c.patch_dim, c.vocab_size
    assert base["pixel_head"] == 2.0 * (c.num_patches - c.image_keep) * dd * p
    assert every["pixel_head"] == 2.0 * c.num_patches * dd * p
    assert base["text_head"] == 2.0 * float((lengths - torch.tensor([2.0, 8.0])).mean()) * dd * v
    assert every["text_head"] == 2.0 * float(lengths.mean()) * dd * v  # every non-padded token
