import torch

from m3ae_engine.model.masking import build_plan, transfer
from m3ae_engine.ops.reference import CLS_SOURCE, FILLER_SOURCE


def _pad_mask(lengths, L):
    return (torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]).float()


def _plan(lengths, packed=True, sharing="sample", device="cpu", Li=16, Ki=4, Lt=12, Kt=3, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    pad = _pad_mask(lengths, Lt).to(device)
    return build_plan(len(lengths), Li, Ki, pad, Lt, Kt, packed=packed, sharing=sharing, generator=g), pad


def test_keep_counts_and_mask_consistency():
    plan, pad = _plan([12, 5, 1, 0, 7])
    B, Li, Ki, Lt, Kt = 5, 16, 4, 12, 3
    assert plan.image_mask.shape == (B, Li) and (plan.image_mask.sum(1) == Li - Ki).all()
    assert (plan.text_mask.sum(1) == Lt - Kt).all()
    # mask and ids_restore agree: visible positions are exactly those ranked < keep
    assert torch.equal(plan.image_mask, (plan.image_ids_restore >= Ki).float())
    for b in range(B):  # ids_restore is a permutation
        assert sorted(plan.image_ids_restore[b].tolist()) == list(range(Li))


def test_packed_encoder_rows_are_cls_image_then_nonpadded_text():
    lengths = [12, 5, 1, 0, 7]
    plan, pad = _plan(lengths)
    cu = plan.enc.cu_seqlens.long()
    src = plan.enc_row_source.long()
    B, Li, Ki, Lt = 5, 16, 4, 12
    for b in range(B):
        rows = src[cu[b]:cu[b + 1]].tolist()
        assert rows[0] == CLS_SOURCE
        img = rows[1:1 + Ki]
        assert all(b * Li <= s < (b + 1) * Li for s in img)
        assert set(s - b * Li for s in img) == set((plan.image_mask[b] == 0).nonzero().flatten().tolist())
        txt = [s - B * Li - b * Lt for s in rows[1 + Ki:]]
        kept_nonpad = [(p) for p in range(Lt) if plan.text_mask[b, p] == 0 and pad[b, p] == 0]
        assert sorted(txt) == kept_nonpad
    assert plan.enc.exact and plan.enc.rows == int(cu[-1])
    assert (src != FILLER_SOURCE).all()


def test_inverse_maps_invert_the_gather():
    plan, pad = _plan([12, 5, 1, 0, 7])
    src = plan.enc_row_source.long()
    B, Li, Lt = 5, 16, 12
    for s, r in enumerate(plan.image_row_of.tolist()):
        if r >= 0:
            assert src[r] == s
    for s, r in enumerate(plan.text_row_of.tolist()):
        if r >= 0:
            assert src[r] == B * Li + s
    assert (plan.image_row_of >= 0).sum() == B * 4


def test_decoder_rows_and_head_weights():
    lengths = [12, 5, 1, 0, 7]
    plan, pad = _plan(lengths)
    B, Li, Lt, Kt = 5, 16, 12, 3
    cu = plan.dec.cu_seqlens.long()
    assert torch.equal(cu[1:] - cu[:-1], 1 + Li + torch.tensor(lengths))
    # every visible (encoder) row feeds exactly one decoder row
    vis = plan.dec_row_visible.long()
    assert sorted(vis[vis >= 0].tolist()) == list(range(plan.enc.rows))
    # text loss weights: per sample 1/count/B over masked non-padded tokens
    w = plan.text_row_weight
    tgt = plan.text_target_index
    for b in range(B):
        sel = (tgt // Lt == b) & (w > 0)
        count = int(((plan.text_mask[b] > 0) & (pad[b] == 0)).sum())
        assert int(sel.sum()) == count
        if count:
            assert torch.allclose(w[sel].sum(), torch.tensor(1.0 / B))
    assert torch.allclose(plan.image_row_weight.sum(), torch.tensor(1.0))


def test_batch_shared_masking_uses_one_permutation():
    plan, _ = _plan([12, 5, 3], sharing="batch")
    assert (plan.image_ids_restore == plan.image_ids_restore[:1]).all()
    assert (plan.text_ids_restore == plan.text_ids_restore[:1]).all()


def test_capacity_layout_has_filler_tail_without_reading_sizes():
    lengths = [12, 5, 1]
    g = torch.Generator().manual_seed(0)
    pad = _pad_mask(lengths, 12)
    plan = build_plan(3, 16, 4, pad, 12, 3, packed=True, generator=g, exact_sizes=False)
    assert not plan.enc.exact and plan.enc.rows == 3 * (1 + 4 + 3)
    assert plan.dec.rows == 3 * (1 + 16 + 12)
    n_valid = int(plan.enc.cu_seqlens[-1])
    assert (plan.enc_row_source[n_valid:] == FILLER_SOURCE).all()
    assert (plan.enc_row_source[:n_valid] != FILLER_SOURCE).all()
    assert (plan.dec_row_kind[int(plan.dec.cu_seqlens[-1]):] == -1).all()
    assert plan.text_row_weight.shape == (3 * 9,)


def test_padded_layout_sizes():
    plan, _ = _plan([12, 5, 1], packed=False)
    assert plan.enc.rows == 3 * (1 + 4 + 3) and plan.dec.rows == 3 * (1 + 16 + 12)
    assert plan.enc.key_padding_mask.shape == (3, 8)


def test_transfer_packs_every_dtype_into_one_buffer_and_views_it_back():
    """MaskingPlan.to's single copy: int32 / int64 / float32 / bool tensors of odd sizes (unaligned byte
    counts) come back equal, with their own dtype and shape, as views of one buffer."""
    plan, _ = _plan([5, 12, 3])
    tensors = [v for obj in (plan, plan.enc, plan.dec) for v in vars(obj).values() if isinstance(v, torch.Tensor)]
    tensors += [torch.tensor([True, False, True]), torch.zeros(0, dtype=torch.int32), torch.arange(5).view(5, 1)]
    assert {t.dtype for t in tensors} >= {torch.int32, torch.int64, torch.float32, torch.bool}
    moved = transfer(tensors, "cpu")
    base = moved[0].untyped_storage().data_ptr()
    for t, m in zip(tensors, moved):
        assert m.dtype == t.dtype and m.shape == t.shape and torch.equal(m, t)
        assert m.untyped_storage().data_ptr() == base  # one buffer, one copy
