"""The M3AE model against an independent, padded, line-by-line port of the official forward
(young-geng/m3ae_public m3ae/model.py + m3ae_main.py losses), plus shapes, gradients and errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from m3ae_engine import InputError, M3AE, M3AEConfig
from m3ae_engine.model.masking import build_plan
from m3ae_engine.model.pos_embed import sincos_1d, sincos_2d
from m3ae_engine.ops.reference import patchify


def _batch(c, b=4, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (b, 3, c.image_size, c.image_size), dtype=torch.uint8, generator=g)
    text = torch.randint(1, c.vocab_size, (b, c.text_length), generator=g)
    lengths = lengths or [c.text_length, 5, 1, 0][:b] + [3] * max(0, b - 4)
    pad = (torch.arange(c.text_length)[None] >= torch.tensor(lengths)[:, None]).float()
    text = torch.where(pad > 0, torch.zeros_like(text), text)
    noise_i = torch.rand(b, c.num_patches, generator=g)
    noise_t = torch.rand(b, c.text_length, generator=g)
    return image, text, pad, noise_i, noise_t


def _official_forward(m, image, text, pad, noise_i, noise_t):
    """Padded official semantics, written independently of the engine's plan/ops."""
    c = m.config
    B = image.shape[0]
    mean = torch.tensor(c.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(c.image_std).view(1, 3, 1, 1)
    img = (image.float() / 255 - mean) / std
    patches = patchify(img, c.patch_size)  # [B, L, P] (p, p, c) order
    Li, Lt = patches.shape[1], text.shape[1]
    ki, kt = int(Li * (1 - c.image_mask_ratio)), int(Lt * (1 - c.text_mask_ratio))

    def masking(x, noise, keep, padding=None):
        ids_shuffle = torch.argsort(noise, 1)
        ids_restore = torch.argsort(ids_shuffle, 1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
        mask = torch.ones(x.shape[:2])
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        pk = None if padding is None else torch.gather(padding, 1, ids_shuffle[:, :keep])
        return kept, mask, ids_restore, pk

    def block(blk, x, padding):
        h = F.layer_norm(x, (x.shape[-1],), blk.norm1.weight, blk.norm1.bias, 1e-6)
        n, s, d = h.shape
        heads = blk.attn.num_heads
        qkv = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(n, s, 3, heads, d // heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
        att = torch.where(padding[:, None, None, :] > 0, torch.tensor(-1e7), att)
        att = att.softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(n, s, d)
        x = x + (o @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        h = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        h = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias, approximate="tanh")
        return x + (h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)

    D, Dd = c.emb_dim, c.dec_emb_dim
    image_x = patches @ m.image_embedding.weight.T + m.image_embedding.bias + sincos_2d(D, c.grid_size) \
        + m.encoder_image_type_embedding
    image_x, image_mask, image_restore, _ = masking(image_x, noise_i, ki)
    text_x = m.text_embedding.weight[text] + sincos_1d(D, torch.arange(Lt).float()) + m.encoder_text_type_embedding
    text_x, text_mask, text_restore, pad_kept = masking(text_x, noise_t, kt, pad)
    x = torch.cat([m.cls_token.expand(B, 1, D), image_x, text_x], 1)
    padding = torch.cat([torch.zeros(B, 1 + ki), pad_kept], 1)
    for blk in m.encoder:
        x = block(blk, x, padding)
    x = F.layer_norm(x, (D,), m.encoder_norm.weight, m.encoder_norm.bias, 1e-6)
    proj = lambda t: t @ m.decoder_input_projection.weight.T + m.decoder_input_projection.bias  # noqa: E731
    cls_x, image_x, text_x = proj(x[:, :1]), proj(x[:, 1:1 + ki]), proj(x[:, 1 + ki:])

    def unshuffle(t, restore, mask_tok):
        t = torch.cat([t, mask_tok.expand(B, restore.shape[1] - t.shape[1], Dd)], 1)
        return torch.gather(t, 1, restore[..., None].expand(-1, -1, Dd))

    image_x = unshuffle(image_x, image_restore, m.image_mask_embedding) + sincos_2d(Dd, c.grid_size) \
        + m.decoder_image_type_embedding
    text_x = unshuffle(text_x, text_restore, m.text_mask_embedding) + sincos_1d(Dd, torch.arange(Lt).float()) \
        + m.decoder_text_type_embedding
    x = torch.cat([cls_x, image_x, text_x], 1)
    padding = torch.cat([torch.zeros(B, 1 + Li), pad], 1)
    for blk in m.decoder:
        x = block(blk, x, padding)
    x = F.layer_norm(x, (Dd,), m.decoder_norm.weight, m.decoder_norm.bias, 1e-6)
    image_out = x[:, 1:1 + Li] @ m.decoder_image_output.weight.T + m.decoder_image_output.bias
    text_out = x[:, 1 + Li:] @ m.decoder_text_output.weight.T + m.decoder_text_output.bias
    # patch_mse_loss
    valid_ratio = image_mask.sum(-1) / Li
    per = torch.where(image_mask > 0, ((patches - image_out) ** 2).mean(-1), torch.tensor(0.0)).mean(-1)
    image_loss = (per / valid_ratio).mean()
    # cross_entropy_loss_and_accuracy with valid = text_mask AND not padding
    valid = ((text_mask > 0) & (pad == 0)).float()
    count = valid.sum(-1).clamp_min(1e-5)
    lp = torch.log_softmax(text_out, -1).gather(-1, text[..., None]).squeeze(-1)
    text_loss = -((torch.where(valid > 0, lp, torch.tensor(0.0)).sum(-1)) / count).mean()
    acc = ((torch.where(valid > 0, (text_out.argmax(-1) == text).float(), torch.tensor(0.0)).sum(-1)) / count).mean()
    return image_loss, text_loss, acc, image_mask, text_mask


@pytest.mark.parametrize("packed", [True, False])
def test_model_equals_official_formulation(packed):
    torch.manual_seed(0)
    c = M3AEConfig.from_preset("tiny", packed=packed, text_loss_weight=0.1)
    m = M3AE(c)
    image, text, pad, ni, nt = _batch(c)
    out = m(image, text, pad, image_noise=ni, text_noise=nt)
    il, tl, acc, im, tm = _official_forward(m, image, text, pad, ni, nt)
    assert torch.allclose(out.image_loss, il, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.text_loss, tl, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.text_accuracy, acc, atol=1e-6)
    assert torch.equal(out.image_mask, im) and torch.equal(out.text_mask, tm)
    assert torch.allclose(out.loss, il + 0.1 * tl, rtol=1e-5)
    # gradients agree too
    g1 = torch.autograd.grad(out.loss, list(m.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(il + 0.1 * tl, list(m.parameters()), allow_unused=True)
    for (name, _), a, b in zip(m.named_parameters(), g1, g2):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_capacity_layout_gives_the_same_loss():
    torch.manual_seed(1)
    c = M3AEConfig.from_preset("tiny")
    m = M3AE(c)
    image, text, pad, ni, nt = _batch(c)
    exact = m(image, text, pad, image_noise=ni, text_noise=nt)
    plan = build_plan(4, c.num_patches, c.image_keep, pad, c.text_length, c.text_keep, image_noise=ni,
                      text_noise=nt, exact_sizes=False)
    cap = m(image, text, pad, plan=plan)
    assert plan.enc.rows > int(plan.enc.cu_seqlens[-1])
    assert torch.allclose(exact.loss, cap.loss, rtol=1e-6)
    ga = torch.autograd.grad(exact.loss, list(m.parameters()))
    gb = torch.autograd.grad(cap.loss, list(m.parameters()))
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_parameter_gets_a_gradient():
    c = M3AEConfig.from_preset("tiny")
    m = M3AE(c)
    image, text, pad, _, _ = _batch(c)
    m(image, text, pad).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "text_embedding.weight":
            assert p.grad.abs().sum() > 0, name


def test_image_only_and_text_only_forwards():
    c = M3AEConfig.from_preset("tiny")
    m = M3AE(c)
    image, text, pad, ni, nt = _batch(c)
    img_only = m(image)
    assert img_only.text_loss is None and torch.isfinite(img_only.image_loss)
    assert img_only.image_prediction.shape == (4, c.num_patches - c.image_keep, c.patch_dim)
    assert img_only.image_prediction_full().shape == (4, c.num_patches, c.patch_dim)
    txt_only = m(text=text, text_padding_mask=pad)
    assert txt_only.image_loss is None and torch.isfinite(txt_only.text_loss)
    txt_only.loss.backward()
    assert m.image_embedding.weight.grad is None or m.image_embedding.weight.grad.abs().sum() == 0


def test_float_images_are_taken_as_normalised():
    c = M3AEConfig.from_preset("tiny")
    m = M3AE(c)
    image, _, _, ni, _ = _batch(c)
    mean = torch.tensor(c.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(c.image_std).view(1, 3, 1, 1)
    a = m(image, image_noise=ni)
    b = m((image.float() / 255 - mean) / std, image_noise=ni)
    assert torch.allclose(a.loss, b.loss, rtol=1e-5)


def test_batch_shared_masking_and_mae_norm_pix():
    c = M3AEConfig.from_preset("tiny", mask_sharing="batch", norm_pix_loss=True)
    m = M3AE(c)
    image, text, pad, _, _ = _batch(c)
    out = m(image, text, pad)
    assert (out.image_mask == out.image_mask[:1]).all()
    assert torch.isfinite(out.loss)


def test_forward_representation_shapes():
    c = M3AEConfig.from_preset("tiny")
    m = M3AE(c)
    image, text, pad, _, _ = _batch(c)
    assert m.forward_representation(image).shape == (4, 1 + c.num_patches, c.emb_dim)
    rep = m.forward_representation(image, text, pad)
    assert rep.shape == (4, 1 + c.num_patches + c.text_length, c.emb_dim)


def test_official_initialisation_and_no_decay_groups():
    torch.manual_seed(0)
    m = M3AE(M3AEConfig.from_preset("tiny", emb_dim=256, num_heads=4))
    assert abs(m.text_embedding.weight.std().item() - 1.0) < 0.02
    assert abs(m.cls_token.std().item() - 0.02) < 0.02
    w = m.encoder[0].attn.qkv.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    decay, no_decay = m.param_groups(0.05)
    nd = {id(p) for p in no_decay["params"]}
    assert id(m.text_embedding.weight) in nd and id(m.cls_token) in nd and id(m.encoder[0].attn.qkv.bias) in nd
    assert id(m.encoder[0].attn.qkv.weight) not in nd and id(m.image_embedding.weight) not in nd


def test_clear_errors_for_bad_inputs():
    c = M3AEConfig.from_preset("tiny")
    m = M3AE(c)
    image, text, pad, _, _ = _batch(c)
    with pytest.raises(InputError, match="image must be"):
        m(image[:, :, :16])
    with pytest.raises(InputError, match="uint8"):
        m(image.to(torch.int32))
    with pytest.raises(InputError, match=r"\[0, 30522\)"):
        bad = text.clone()
        bad[0, 0] = 40000
        m(image, bad, pad)
    with pytest.raises(InputError, match="text_padding_mask"):
        m(image, text, None)
    with pytest.raises(InputError, match="batch sizes differ"):
        m(image[:2], text, pad)
    with pytest.raises(InputError, match="text must be"):
        m(image, text[:, :5], pad[:, :5])
    with pytest.raises(InputError, match="needs an image"):
        m()
    with pytest.raises(TypeError, match="M3AEConfig"):
        M3AE({"preset": "tiny"})


def test_image_only_plan_follows_the_noise_device():
    # MAE mode passes CPU noise to a GPU model: the plan is built where the noise is (meta stands in
    # for the GPU here: a plan built on it with CPU noise used to fail with a device mismatch)
    plan = build_plan(2, 16, 4, None, 0, 0, has_image=True, device="meta", image_noise=torch.rand(2, 16))
    assert plan.enc_row_source.device.type == "cpu" and plan.enc.rows == 2 * 5


def test_decoder_residual_stream_keeps_parameter_dtype_under_autocast():
    c = M3AEConfig.from_preset("tiny")
    m = M3AE(c)
    image, text, pad, ni, nt = _batch(c)
    seen = {}
    m.decoder[0].register_forward_hook(lambda mod, inp, out: seen.update(dec=inp[0].dtype))
    m.encoder[0].register_forward_hook(lambda mod, inp, out: seen.update(enc=inp[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(image, text, pad, image_noise=ni, text_noise=nt)
    assert seen == {"enc": torch.float32, "dec": torch.float32}  # as the official / MAE code under autocast
    assert torch.isfinite(out.loss)


def test_text_parameters_are_the_text_path():
    m = M3AE(M3AEConfig.from_preset("tiny"))
    names = {n for n, p in m.named_parameters() if any(p is q for q in m.text_parameters())}
    assert names == {"text_embedding.weight", "encoder_text_type_embedding", "decoder_text_type_embedding",
                     "text_mask_embedding", "decoder_text_output.weight", "decoder_text_output.bias"}
