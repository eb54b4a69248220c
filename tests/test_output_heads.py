"""output_head_depth: the official MLP output heads (young-geng/m3ae_public m3ae/model.py, class MLP).

The official head is transcribed from flax to torch in official_m3ae.py (`official_mlp`) and runs on a
params dict laid out as the flax tree (`LayerNorm_0/scale`, `Dense_i/kernel` [in, out], ...), so the
tests also pin the state-dict <-> flax-path table (`heads.official_head_keys`) the converter uses.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from official_m3ae import batch, flax_params, official_losses, official_mlp, same_masks

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.model.heads import OutputHead, official_head_keys


def _randomise(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_matches_official_formula(depth, dtype):
    gen = torch.Generator().manual_seed(depth)
    head = OutputHead(12, 7, depth, eps=1e-6, gelu="tanh")
    _randomise(head, gen)  # non-trivial LayerNorm scales/biases too
    x = torch.randn(13, 12, generator=gen)
    want = official_mlp(x.double(), {k: v.double() for k, v in flax_params(head).items()}, depth)
    got = head.to(dtype)(x.to(dtype))
    assert got.shape == (13, 7) and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    # hidden() is everything before the last Linear: the fused CE takes the rest
    torch.testing.assert_close(F.linear(head.hidden(x.to(dtype)), head.weight, head.bias), got)


def test_head_state_dict_keys_and_official_paths():
    dd, out = 8, 5
    for depth in (0, 1, 2):
        head = OutputHead(dd, out, depth, 1e-6, "tanh")
        table = official_head_keys("decoder_text_output", depth)
        keys = {k[len("decoder_text_output."):] for k, _, _ in table}
        assert keys == set(head.state_dict())
        paths = [p for _, p, _ in table]
        assert len(set(paths)) == len(paths)
        n_dense = sum(1 for p in paths if "/Dense_" in p and p.endswith("/kernel"))
        n_norm = sum(1 for p in paths if "/LayerNorm_" in p and p.endswith("/scale"))
        assert (n_dense, n_norm) == (depth + 1, depth + (1 if depth else 0))
        assert ("decoder_text_output.weight", f"decoder_text_output/Dense_{depth}/kernel", True) in table
    # depth 0: the keys of a plain nn.Linear, as before output_head_depth existed
    m = M3AE(M3AEConfig.from_preset("tiny"))
    assert sorted(k for k in m.state_dict() if "_output" in k) == [
        "decoder_image_output.bias", "decoder_image_output.weight",
        "decoder_text_output.bias", "decoder_text_output.weight"]


def test_head_initialisation_is_official():
    torch.manual_seed(0)
    dd, out = 64, 48
    head = OutputHead(dd, out, 2, 1e-6, "tanh")
    for name, p in head.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
            a = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
            assert p.abs().max() <= a and p.abs().max() > 0.9 * a, name
    # the model's reset_parameters keeps it (the heads are not plain Linears any more)
    m = M3AE(M3AEConfig.from_preset("tiny", output_head_depth=1))
    assert torch.equal(m.decoder_text_output.layers[0].norm.weight, torch.ones(32))
    assert not m.decoder_image_output.bias.any()
    assert m.decoder_text_output.input_norm.eps == m.config.layer_norm_eps == 1e-6


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_model_with_mlp_heads_matches_official_loss(kernels):
    torch.manual_seed(0)
    c = M3AEConfig.from_preset("tiny", output_head_depth=2, packed=False, kernels="torch", attention="math")
    ref = M3AE(c)
    for m in (ref.decoder_image_output, ref.decoder_text_output):
        _randomise(m, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(1)
    b = 3
    image, text, pad = batch(c, b, gen)
    plan = ref.make_plan(b, True, pad, generator=torch.Generator().manual_seed(2))
    want_img, want_txt, _ = official_losses(ref, image, text, pad, plan)
    (want_img + 0.5 * want_txt).backward()
    want_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if "_output" in n}
    ref.zero_grad()

    model = copy.deepcopy(ref)
    model.config = copy.deepcopy(c)
    model.config.kernels = kernels
    out = model(image, text, pad, plan=plan)
    torch.testing.assert_close(out.image_loss, want_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.text_loss, want_txt, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for n, g in want_grads.items():
        p = dict(model.named_parameters())[n]
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
    # the packed layout gives the same losses on the same masks
    model.config.packed = True
    packed = model(image, text, pad, **same_masks(plan))
    torch.testing.assert_close(packed.loss, out.loss, rtol=1e-5, atol=1e-6)


def test_text_only_parameters_include_the_mlp_text_head():
    m = M3AE(M3AEConfig.from_preset("tiny", output_head_depth=1))
    ids = {id(p) for p in m.text_parameters()}
    assert all(id(p) in ids for p in m.decoder_text_output.parameters())
    assert not any(id(p) in ids for p in m.decoder_image_output.parameters())


def test_flops_count_the_mlp_head_layers():
    from m3ae_engine.model.flops import m3ae_flops
    c0 = M3AEConfig.from_preset("tiny")
    c2 = M3AEConfig.from_preset("tiny", output_head_depth=2)
    lengths, kept = torch.tensor([5.0, 32.0]), torch.tensor([2.0, 8.0])
    f0 = m3ae_flops(c0, lengths, kept_text=kept, training=False, breakdown=True)
    f2 = m3ae_flops(c2, lengths, kept_text=kept, training=False, breakdown=True)
    dd = c0.dec_emb_dim
    masked_patches = c0.num_patches - c0.image_keep
    assert f2["pixel_head"] - f0["pixel_head"] == masked_patches * 2 * 2 * dd * dd
    assert f2["text_head"] - f0["text_head"] == float((lengths - kept).mean()) * 2 * 2 * dd * dd
