"""The official M3AE losses, transcribed line by line from young-geng/m3ae_public (jnp -> torch), for tests.

m3ae/model.py: MLP (the output heads), patch_mse_loss, cross_entropy_loss_and_accuracy;
m3ae/m3ae_main.py and mae_main.py: which positions they get (image_all_token_loss passes no mask,
text_all_token_loss uses every token, both intersected with "not padding" for text).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from m3ae_engine import M3AE, M3AEConfig, ops

from m3ae_engine.model.heads import official_head_keys
from m3ae_engine.ops.reference import normalize_image, patchify


def official_mlp(x, params, depth):
    """flax MLP(hidden_dim=Dd, output_dim, depth, input_norm=depth > 0): nn.LayerNorm() has eps 1e-6,
    nn.gelu is the tanh approximation, the residual starts at the second layer. params: flax paths
    relative to the head (`LayerNorm_0/scale`, `Dense_i/kernel` [in, out], ...)."""
    def layer_norm(v, name):
        return F.layer_norm(v, (v.shape[-1],), params[f"{name}/scale"], params[f"{name}/bias"], 1e-6)

    def dense(v, name):
        return v @ params[f"{name}/kernel"] + params[f"{name}/bias"]

    if depth > 0:
        x = layer_norm(x, "LayerNorm_0")
    for i in range(depth):
        y = dense(x, f"Dense_{i}")
        y = F.gelu(y, approximate="tanh")
        y = layer_norm(y, f"LayerNorm_{i + 1}")
        if i > 0:
            x = x + y
        else:
            x = y
    return dense(x, f"Dense_{depth}")


def flax_params(head, prefix="head"):
    """An engine OutputHead's parameters as the official flax tree holds them (kernels [in, out])."""
    named = dict(head.named_parameters())  # not state_dict(): that one is detached
    out = {}
    for key, path, transpose in official_head_keys(prefix, head.depth):
        t = named[key[len(prefix) + 1:]]
        out[path[len(prefix) + 1:]] = t.t() if transpose else t
    return out


def all_mask(x):
    return torch.ones(x.shape[:2])


def patch_mse_loss(patch_output, patch_target, valid=None):
    if valid is None:
        valid = all_mask(patch_target)
    valid_ratio = torch.sum(valid, dim=-1) / valid.shape[-1]
    return torch.mean(
        torch.mean(
            torch.where(valid > 0.0, torch.mean(torch.square(patch_target - patch_output), dim=-1), 0.0),
            dim=-1,
        ) / valid_ratio
    )


def cross_entropy_loss_and_accuracy(logits, tokens, valid=None):
    if valid is None:
        valid = all_mask(tokens)
    valid_text_length = torch.clamp_min(torch.sum(valid, dim=-1), 1e-5)
    token_log_prob = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None].long()).squeeze(-1)
    token_log_prob = torch.where(valid > 0.0, token_log_prob, 0.0)
    loss = -torch.mean(torch.sum(token_log_prob, dim=-1) / valid_text_length)
    correct = torch.where(valid > 0.0, torch.argmax(logits, dim=-1) == tokens, False)
    accuracy = torch.mean(torch.sum(correct, dim=-1) / valid_text_length)
    return loss, accuracy


def mae_norm_pix_target(target):
    """facebookresearch/mae forward_loss with norm_pix_loss."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1.0e-6) ** 0.5


def official_losses(model, image, text, pad, plan):
    """(image_loss, text_loss, text_accuracy) of the official train step on the engine model's decoder
    output: heads on ALL decoder positions, then the losses with the masks the config's all-token flags
    select. `plan` must use the padded layout (every sample 1 + Li + Lt decoder rows)."""
    c = model.config
    b = (image if image is not None else text).shape[0]
    li = c.num_patches if image is not None else 0
    lt = c.text_length if text is not None else 0
    assert not plan.dec.packed
    d = model.decode(model.encode(image, text, plan), plan).view(b, 1 + li + lt, -1)
    depth = c.output_head_depth
    image_loss = text_loss = text_acc = None
    if image is not None:
        img_out = official_mlp(d[:, 1:1 + li], flax_params(model.decoder_image_output), depth)  # [B, Li, P]
        target = patchify(normalize_image(image, c.image_mean, c.image_std), c.patch_size)
        if c.norm_pix_loss:
            target = mae_norm_pix_target(target)
        image_loss = patch_mse_loss(img_out, target, None if c.image_all_token_loss else plan.image_mask)
    if text is not None:
        txt_out = official_mlp(d[:, 1 + li:], flax_params(model.decoder_text_output), depth)  # [B, Lt, V]
        chosen = all_mask(text) if c.text_all_token_loss else plan.text_mask
        valid = torch.logical_and(chosen > 0, (1.0 - pad) > 0).float()  # mask_intersection(., mask_not(pad))
        text_loss, text_acc = cross_entropy_loss_and_accuracy(txt_out, text, valid)
    return image_loss, text_loss, text_acc


def batch(c, b, gen, lengths=None, with_image=True, with_text=True):
    """uint8 images, token ids and a padding mask with odd caption lengths (one full, one of 1)."""
    image = text = pad = None
    if with_image:
        image = torch.randint(0, 256, (b, 3, c.image_size, c.image_size), dtype=torch.uint8, generator=gen)
    if with_text:
        if lengths is None:
            lengths = torch.tensor([1, c.text_length, 9, 4, 17][:b])
        pad = (torch.arange(c.text_length)[None] >= lengths[:, None]).float()
        text = torch.randint(1, c.vocab_size, (b, c.text_length), generator=gen) * (1 - pad).long()
    return image, text, pad


def same_masks(plan):
    """Noise that makes build_plan draw `plan`'s permutations again (argsort(ids_restore) = ids_shuffle)."""
    out = {}
    if plan.image_ids_restore is not None:
        out["image_noise"] = plan.image_ids_restore.float()
    if plan.text_ids_restore is not None:
        out["text_noise"] = plan.text_ids_restore.float()
    return out


# ---------------------------------------------------------------------------------------------- harness
def engine_and_reference(cfg_kw, backend, emulated_backend, monkeypatch):
    """(ref, model): the tiny model with `cfg_kw` on kernels='torch' (padded layout), and a copy on
    `backend` (for 'cuda', the emulated backend is installed through monkeypatch)."""
    torch.manual_seed(0)
    c = M3AEConfig.from_preset("tiny", packed=False, kernels="torch", attention="math", **cfg_kw)
    ref = M3AE(c)
    model = copy.deepcopy(ref)
    model.config = with_fields(c, kernels=backend)
    if backend == "cuda":
        monkeypatch.setitem(ops._INSTANCES, "cuda", emulated_backend)
    return ref, model


def with_fields(c, **kw):
    out = copy.deepcopy(c)
    for k, v in kw.items():
        setattr(out, k, v)
    return out


def check_against_official(ref, model, image, text, pad, b, seed=2):
    """Engine loss/accuracy/gradients (model, padded, then packed on the same masks) == official formula
    (ref, a kernels='torch' copy)."""
    c = ref.config
    gen = torch.Generator().manual_seed(seed)
    plan = ref.make_plan(b, image is not None, pad, generator=gen)
    want_img, want_txt, want_acc = official_losses(ref, image, text, pad, plan)
    want = sum(w * l for w, l in ((c.image_loss_weight, want_img), (c.text_loss_weight, want_txt)) if l is not None)
    want.backward()
    with _no_torch_fallback(model.config.kernels):
        return _check_model(ref, model, image, text, pad, plan, want_img, want_txt, want_acc)


@contextlib.contextmanager
def _no_torch_fallback(backend):
    """On the triton / cuda runs, any call into the torch backend's ops fails the test."""
    if backend == "torch":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        for name in ("gather", "unshuffle", "masked_mse", "linear_cross_entropy"):
            def fail(*a, _name=name, **k):
                raise AssertionError(f"the torch backend's {_name} ran on the {backend} path")
            mp.setattr(ops.TorchBackend, name, staticmethod(fail))
        yield


def _check_model(ref, model, image, text, pad, plan, want_img, want_txt, want_acc):
    out = model(image, text, pad, plan=plan)
    if want_img is not None:
        torch.testing.assert_close(out.image_loss, want_img, rtol=1e-5, atol=1e-6)
    if want_txt is not None:
        torch.testing.assert_close(out.text_loss, want_txt, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.text_accuracy, want_acc.float(), rtol=1e-6, atol=1e-6)
    out.loss.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        g_ref = ref_params[n].grad
        if g_ref is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=1e-6, msg=lambda s: f"grad {n}: {s}")
    model.config.packed = True
    packed = model(image, text, pad, **same_masks(plan))
    torch.testing.assert_close(packed.loss, out.loss, rtol=1e-5, atol=1e-6)
    return out
