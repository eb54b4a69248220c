"""Conversion of official M3AE (Flax) parameter trees and facebookresearch/mae state dicts.

The official tree is written out by hand from the official module names (official_helpers.py, not from the
converter's table), and the official block is re-implemented in NumPy from the official semantics.
"""
import pickle
import types

import numpy as np
import pytest
import torch

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.model.attention import AttentionContext
from m3ae_engine.interop.cli import main
from m3ae_engine.interop.exported import save_checkpoint
from m3ae_engine.interop.load import load_model, read_checkpoint
from m3ae_engine.interop.mae import mae_config_from_state_dict, mae_to_state_dict
from m3ae_engine.interop.official import config_from_official, official_to_state_dict, state_dict_to_official
from m3ae_engine.interop.report import ConversionError, flatten_tree
from m3ae_engine.model.masking import SequenceLayout
from m3ae_engine.interop.official_pickle import OfficialCheckpointError, read_official_checkpoint

from official_helpers import (D, DD, DDEPTH, DEPTH, DHEADS, HEADS, IMG, LT, P, V, np_gelu_tanh, np_layernorm,
                              official_tree)

def tiny_official_config(**kw):
    return M3AEConfig(emb_dim=D, depth=DEPTH, num_heads=HEADS, dec_emb_dim=DD, dec_depth=DDEPTH,
                      dec_num_heads=DHEADS, image_size=IMG, patch_size=P, text_length=LT, vocab_size=V, **kw)


# ---------------------------------------------------------------- NumPy official semantics
def np_block(x, p, heads):
    """Official Flax Block on x [B, N, C] (float64)."""
    b, n, c = x.shape
    h = np_layernorm(x, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"])
    att = p["Attention_0"]
    qkv = h @ att["Dense_0"]["kernel"] + att["Dense_0"]["bias"]
    qkv = qkv.reshape(b, n, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = q @ k.swapaxes(-2, -1) * (c // heads) ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = (a @ v).swapaxes(1, 2).reshape(b, n, c)
    x = x + o @ att["Dense_1"]["kernel"] + att["Dense_1"]["bias"]
    h = np_layernorm(x, p["LayerNorm_1"]["scale"], p["LayerNorm_1"]["bias"])
    mlp = p["TransformerMLP_0"]
    h = np_gelu_tanh(h @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]) @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
    return x + h


def np_sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def np_sincos_2d(dim, g):
    grid = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))  # w goes first
    return np.concatenate([np_sincos_1d(dim // 2, grid[0]), np_sincos_1d(dim // 2, grid[1])], axis=1)


def np_patchify(img, p):  # img [B, H, W, C] -> [B, L, p*p*C]
    b, h, w, c = img.shape
    x = img.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def np_official_encoder(tree, img_hwc, text, heads):
    """Official M3AE encoder on the unmasked image + text: [B, 1 + L + Lt, D]."""
    t = lambda *k: np.float64(_get(tree, k))  # noqa: E731
    d = t("cls_token").shape[-1]
    patches = np_patchify(img_hwc, P)
    x_img = patches @ t("image_embedding", "kernel") + t("image_embedding", "bias")
    x_img = x_img + np_sincos_2d(d, IMG // P)[None] + t("encoder_image_type_embedding")
    x_txt = t("text_embedding", "embedding")[text] + np_sincos_1d(d, np.arange(text.shape[1]))[None]
    x_txt = x_txt + t("encoder_text_type_embedding")
    cls = np.broadcast_to(t("cls_token"), (img_hwc.shape[0], 1, d))
    x = np.concatenate([cls, x_img, x_txt], axis=1)
    for i in range(DEPTH):
        x = np_block(x, _f64(tree["encoder"][f"Block_{i}"]), heads)
    return np_layernorm(x, t("encoder", "LayerNorm_0", "scale"), t("encoder", "LayerNorm_0", "bias"))


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _f64(tree):
    return {k: _f64(v) if isinstance(v, dict) else np.float64(v) for k, v in tree.items()}


# ---------------------------------------------------------------- tests
def test_official_tree_converts_runs_and_roundtrips(tmp_path):
    rng = np.random.default_rng(0)
    tree = official_tree(rng)
    # a pickle as the official code writes it: {'state': <object with .params>, ...}
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"step": 3, "state": types.SimpleNamespace(params={"params": tree}, step=3)}, f)
    flat = flatten_tree(read_official_checkpoint(path).params)
    cfg = config_from_official(flat, image_size=IMG, text_length=LT, num_heads=HEADS, dec_num_heads=DHEADS)
    assert (cfg.emb_dim, cfg.depth, cfg.dec_emb_dim, cfg.dec_depth, cfg.patch_size, cfg.vocab_size) == \
        (D, DEPTH, DD, DDEPTH, P, V)
    sd, report = official_to_state_dict(flat, cfg)
    assert report.ok and not report.not_converted, str(report)
    model = M3AE(cfg)
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys
    # the model runs a masked forward
    img = torch.randint(0, 256, (2, 3, IMG, IMG), dtype=torch.uint8)
    text = torch.randint(1, V, (2, LT))
    pad = torch.zeros(2, LT)
    pad[1, 5:] = 1
    out = model(img, text, pad, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    # exact round trip back to the official tree
    back = flatten_tree(state_dict_to_official(model.state_dict(), cfg))
    assert set(back) == set(flat)
    for k in flat:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], flat[k]), k


def test_one_block_matches_numpy_official_block():
    rng = np.random.default_rng(1)
    tree = official_tree(rng)
    cfg = tiny_official_config()
    sd, report = official_to_state_dict(flatten_tree(tree), cfg)
    assert report.ok, str(report)
    model = M3AE(cfg)
    model.load_state_dict(sd)
    b, n = 3, 7
    x = rng.standard_normal((b, n, D)).astype(np.float32)
    layout = SequenceLayout(cu_seqlens=torch.arange(0, (b + 1) * n, n, dtype=torch.int32), max_seqlen=n,
                            rows=b * n, exact=True, batch=b, slot=n, packed=False)
    ctx = AttentionContext.build(layout, None, "cpu")
    with torch.no_grad():
        got = model.encoder[1](torch.from_numpy(x).reshape(b * n, D), ctx).reshape(b, n, D).numpy()
    want = np_block(np.float64(x), _f64(tree["encoder"]["Block_1"]), HEADS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the decoder block (other width and head count)
    y = rng.standard_normal((b, n, DD)).astype(np.float32)
    with torch.no_grad():
        got = model.decoder[0](torch.from_numpy(y).reshape(b * n, DD), ctx).reshape(b, n, DD).numpy()
    np.testing.assert_allclose(got, np_block(np.float64(y), _f64(tree["decoder"]["Block_0"]), DHEADS),
                               rtol=1e-4, atol=1e-4)


def test_converted_encoder_matches_numpy_official_encoder():
    rng = np.random.default_rng(2)
    tree = official_tree(rng)
    cfg = tiny_official_config()
    model = M3AE(cfg)
    model.load_state_dict(official_to_state_dict(flatten_tree(tree), cfg)[0])
    img = rng.integers(0, 256, (2, IMG, IMG, 3)).astype(np.uint8)
    text = rng.integers(1, V, (2, LT))
    mean, std = np.array(cfg.image_mean), np.array(cfg.image_std)
    want = np_official_encoder(tree, (img / 255.0 - mean) / std, text, HEADS)
    got = model.forward_representation(torch.from_numpy(img).permute(0, 3, 1, 2), torch.from_numpy(text),
                                       torch.zeros(2, LT)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


def test_image_only_official_tree_reports_text_not_converted():
    tree = official_tree(np.random.default_rng(3), with_text=False)
    cfg = tiny_official_config()
    sd, report = official_to_state_dict(flatten_tree(tree), cfg)
    assert report.ok
    assert "text_embedding.weight" in report.not_converted and "decoder_text_output.weight" in report.not_converted
    model = M3AE(cfg)
    model.load_state_dict(sd, strict=False)
    out = model(torch.randint(0, 256, (2, 3, IMG, IMG), dtype=torch.uint8))
    assert out.text_loss is None and torch.isfinite(out.image_loss)


def test_official_missing_unexpected_and_shape_errors_are_reported(tmp_path):
    tree = official_tree(np.random.default_rng(4))
    del tree["encoder"]["Block_1"]["TransformerMLP_0"]["fc2"]
    tree["extra_head"] = {"kernel": np.zeros((2, 2), np.float32)}
    tree["cls_token"] = np.zeros((1, 1, D + 1), np.float32)
    sd, report = official_to_state_dict(flatten_tree(tree), tiny_official_config())
    assert "encoder/Block_1/TransformerMLP_0/fc2/kernel" in report.missing
    assert "extra_head/kernel" in report.unexpected
    assert any(s.startswith("cls_token") for s in report.shape_mismatch)
    with pytest.raises(ConversionError, match=r"cannot convert: 2 missing \(encoder/Block_1/TransformerMLP_0/fc2/"
                                              r"kernel; encoder/Block_1/TransformerMLP_0/fc2/bias\), 1 mis-shaped \(cls_token \(1, 1, 33\) -> cls_token "
                                              r"expects \(1, 1, 32\)\), 1 unexpected \(extra_head/kernel\) tensors$"):
        report.raise_if_errors()
    no_tree = tmp_path / "no_tree.pkl"
    no_tree.write_bytes(pickle.dumps({"state": {"foo": 1}}))
    with pytest.raises(OfficialCheckpointError, match="no official M3AE parameter tree"):
        read_official_checkpoint(no_tree)


def test_cli_m3ae_to_torch_and_back(tmp_path, capsys):
    tree = official_tree(np.random.default_rng(5))
    src = tmp_path / "official.pkl"
    with open(src, "wb") as f:
        pickle.dump({"state": {"params": {"params": tree}}}, f)
    assert main(["m3ae-to-torch", str(src), str(tmp_path / "conv"), "--image-size", str(IMG), "--text-length",
                 str(LT), "--num-heads", str(HEADS), "--dec-num-heads", str(DHEADS)]) == 0
    model, report = load_model(tmp_path / "conv")
    assert report.ok and model.config.emb_dim == D
    assert main(["torch-to-m3ae", str(tmp_path / "conv"), str(tmp_path / "back.pkl")]) == 0
    flat_back = flatten_tree(read_official_checkpoint(tmp_path / "back.pkl").params)
    for k, v in flatten_tree(tree).items():
        assert np.array_equal(flat_back[k], v), k
    # bad inputs give a clear error and exit code 2
    assert main(["m3ae-to-torch", str(tmp_path / "nope.pkl"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_load_model_rejects_wrong_shapes_and_keys(tmp_path):
    cfg = M3AEConfig.from_preset("tiny")
    sd = M3AE(cfg).state_dict()
    sd["bogus"] = torch.zeros(1)
    sd["cls_token"] = torch.zeros(1, 1, 5)
    save_checkpoint(sd, cfg, tmp_path / "bad")
    with pytest.raises(ConversionError) as e:
        load_model(tmp_path / "bad")
    assert "bogus" in str(e.value) and "cls_token" in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing_dir")


# ---------------------------------------------------------------- facebookresearch/mae
def random_mae_state_dict(rng, d=D, depth=DEPTH, dd=DD, ddepth=DDEPTH, p=P, img=IMG):
    g = img // p
    r = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32) * 0.2)  # noqa: E731

    def pos(w):
        return torch.from_numpy(np.concatenate([np.zeros((1, w)), np_sincos_2d(w, g)]).astype(np.float32))[None]

    def blocks(prefix, n, w):
        out = {}
        for i in range(n):
            for ln in ("norm1", "norm2"):
                out[f"{prefix}.{i}.{ln}.weight"], out[f"{prefix}.{i}.{ln}.bias"] = 1 + r(w), r(w)
            for name, (o, i_) in {"attn.qkv": (3 * w, w), "attn.proj": (w, w), "mlp.fc1": (4 * w, w),
                                  "mlp.fc2": (w, 4 * w)}.items():
                out[f"{prefix}.{i}.{name}.weight"], out[f"{prefix}.{i}.{name}.bias"] = r(o, i_), r(o)
        return out

    sd = {"cls_token": r(1, 1, d), "pos_embed": pos(d), "patch_embed.proj.weight": r(d, 3, p, p),
          "patch_embed.proj.bias": r(d), "norm.weight": 1 + r(d), "norm.bias": r(d),
          "decoder_embed.weight": r(dd, d), "decoder_embed.bias": r(dd), "mask_token": r(1, 1, dd),
          "decoder_pos_embed": pos(dd), "decoder_norm.weight": 1 + r(dd), "decoder_norm.bias": r(dd),
          "decoder_pred.weight": r(p * p * 3, dd), "decoder_pred.bias": r(p * p * 3)}
    sd.update(blocks("blocks", depth, d))
    sd.update(blocks("decoder_blocks", ddepth, dd))
    return sd


def test_mae_pth_converts_to_image_only_mode(tmp_path):
    rng = np.random.default_rng(6)
    msd = random_mae_state_dict(rng)
    path = tmp_path / "mae.pth"
    import argparse
    torch.save({"model": msd, "args": argparse.Namespace(model="mae_vit_tiny"), "epoch": 3}, path)
    sd, cfg, report = read_checkpoint(path, num_heads=HEADS, dec_num_heads=DHEADS, vocab_size=V)
    assert report.ok, str(report)
    assert cfg.gelu == "exact" and not cfg.use_type_embedding and cfg.image_size == IMG and cfg.patch_size == P
    assert "text_embedding.weight" in report.not_converted
    assert any("pos_embed matches" in n for n in report.notes)
    model, _ = load_model(path, num_heads=HEADS, dec_num_heads=DHEADS, vocab_size=V)
    img = torch.randint(0, 256, (2, 3, IMG, IMG), dtype=torch.uint8)
    out = model(img, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.image_loss) and out.text_loss is None
    # patch embedding equals MAE's stride-p conv on the normalised image (independent computation)
    x = (img.float() / 255 - torch.tensor(cfg.image_mean).view(1, 3, 1, 1)) / torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    conv = torch.nn.functional.conv2d(x, msd["patch_embed.proj.weight"], msd["patch_embed.proj.bias"], stride=P)
    want = conv.flatten(2).transpose(1, 2)  # [B, L, D]
    from m3ae_engine.ops.reference import patchify
    got = model.image_embedding(patchify(x, P))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # encoder = MAE forward_encoder with mask ratio 0: cls + pos, blocks (exact GELU), norm
    with torch.no_grad():
        h = torch.cat([msd["cls_token"].expand(2, 1, D), want + msd["pos_embed"][:, 1:]], 1)
        for i in range(DEPTH):
            h = _torch_timm_block(h, {k[len(f"blocks.{i}."):]: v for k, v in msd.items()
                                      if k.startswith(f"blocks.{i}.")}, HEADS, "none")
        h = torch.nn.functional.layer_norm(h, (D,), msd["norm.weight"], msd["norm.bias"], 1e-6)
        torch.testing.assert_close(model.forward_representation(img), h, rtol=1e-4, atol=1e-4)


def test_mae_learned_pos_embed_and_missing_keys_are_errors():
    rng = np.random.default_rng(7)
    msd = random_mae_state_dict(rng)
    msd["pos_embed"] = msd["pos_embed"] + 0.5
    del msd["blocks.1.attn.qkv.bias"]
    cfg = mae_config_from_state_dict(msd, num_heads=HEADS, dec_num_heads=DHEADS, vocab_size=V)
    _, report = mae_to_state_dict(msd, cfg)
    assert "blocks.1.attn.qkv.bias" in report.missing
    assert any("not the fixed" in s for s in report.shape_mismatch)
    with pytest.raises(ConversionError):
        report.raise_if_errors()
    with pytest.raises(ConversionError, match="not an MAE state dict"):
        mae_config_from_state_dict({"foo": torch.zeros(1)})


def _torch_timm_block(x, p, heads, approximate):
    """timm/MAE Block (pre-LN, eps 1e-6) in plain torch functional ops."""
    F = torch.nn.functional
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"], 1e-6)
    qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
    x = x + F.linear((a @ v).transpose(1, 2).reshape(b, n, c), p["attn.proj.weight"], p["attn.proj.bias"])
    h = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"], 1e-6)
    h = F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"]), approximate=approximate)
    return x + F.linear(h, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


def test_cli_mae_to_torch(tmp_path, capsys):
    msd = random_mae_state_dict(np.random.default_rng(8), d=64, dd=32)  # width 64: heads from --num-heads
    torch.save({"model": msd}, tmp_path / "mae.pth")
    assert main(["mae-to-torch", str(tmp_path / "mae.pth"), str(tmp_path / "out"), "--num-heads", "4",
                 "--dec-num-heads", "2"]) == 0
    assert "left at initialisation" in capsys.readouterr().out
    model, report = load_model(tmp_path / "out")
    assert report.ok and model.config.gelu == "exact" and model.config.emb_dim == 64
    torch.testing.assert_close(model.encoder[0].attn.qkv.weight, msd["blocks.0.attn.qkv.weight"])
    # without --num-heads a non-preset width is a clear error
    assert main(["mae-to-torch", str(tmp_path / "mae.pth"), str(tmp_path / "out2")]) == 2
    assert "--num-heads" in capsys.readouterr().err


def test_flax_objects_unpickle_without_flax(tmp_path, monkeypatch, capsys):
    """A pickle holding flax FrozenDicts and a TrainState object loads with only numpy installed."""
    import sys
    fd_mod, ts_mod = types.ModuleType("flax.core.frozen_dict"), types.ModuleType("flax.training.train_state")

    class FrozenDict(dict):
        def __reduce__(self):
            return FrozenDict, (dict(self),)

    class TrainState:
        pass

    for cls, mod in ((FrozenDict, fd_mod), (TrainState, ts_mod)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    for name in ("flax", "flax.core", "flax.training"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    tree = official_tree(np.random.default_rng(9))
    state = TrainState()
    state.step, state.params = 7, FrozenDict({"params": FrozenDict(tree)})
    path = tmp_path / "flax.pkl"
    with open(path, "wb") as f:
        pickle.dump({"state": state, "epoch": 1}, f)
    for name in ("flax", "flax.core", "flax.core.frozen_dict", "flax.training", "flax.training.train_state"):
        monkeypatch.delitem(sys.modules, name)  # flax is "not installed" while loading
    flat = flatten_tree(read_official_checkpoint(path).params)
    for k, v in flatten_tree(tree).items():
        assert np.array_equal(flat[k], v), k
    # a pickle that would run code on load is not executed
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"state": {"params": {"params": tree}}, "x": Evil()}, f)
    capsys.readouterr()
    assert "encoder" in read_official_checkpoint(tmp_path / "evil.pkl").params
    assert "pwned" not in capsys.readouterr().out


# ---------------------------------------------------------------- train.py checkpoint directories
def test_inspect_and_convert_a_training_checkpoint_directory(tmp_path, capsys):
    from m3ae_engine.train.config import TrainConfig
    from m3ae_engine.train.loop import train
    train(TrainConfig(batch_size=4, steps=2, warmup_steps=1, log_every=1, tensorboard=False, ckpt_every=2,
                      num_workers=0, output_dir=str(tmp_path / "run")))
    step_dir = tmp_path / "run" / "checkpoints" / "step_00000002"
    capsys.readouterr()
    assert main(["inspect", str(step_dir)]) == 0
    out = capsys.readouterr().out
    assert "train.py checkpoint: step 2, runtime torch" in out and "optimizer state: " in out
    assert "state.pt (" in out and "preset='tiny'" in out and '"emb_dim": 64' in out
    # its weights convert and load (the same as the run's final export, saved at the same step)
    assert main(["to-torch", str(step_dir), str(tmp_path / "conv")]) == 0
    model, report = load_model(tmp_path / "conv")
    final, _ = load_model(tmp_path / "run")
    for k, v in final.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # and torch-to-m3ae keeps its step
    assert main(["torch-to-m3ae", str(step_dir), str(tmp_path / "o.pkl")]) == 0
    assert read_official_checkpoint(tmp_path / "o.pkl").step == 2
    # a DeepSpeed checkpoint is described, its shards are not read
    ds = tmp_path / "ds_step"
    ds.mkdir()
    (ds / "deepspeed").mkdir()
    (ds / "meta.json").write_text((step_dir / "meta.json").read_text().replace('"runtime": "torch"', '"runtime": "deepspeed"'))
    capsys.readouterr()
    assert main(["inspect", str(ds)]) == 0
    assert "runtime deepspeed" in capsys.readouterr().out
    assert main(["to-torch", str(ds), str(tmp_path / "x")]) == 2
    assert "m3ae_engine.checkpoint export" in capsys.readouterr().err


def test_truncated_torch_file_is_a_one_line_error(tmp_path, capsys):
    good = tmp_path / "mae.pth"
    torch.save({"model": {"cls_token": torch.ones(1, 1, 8)}}, good)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good.read_bytes()[:64])
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: unreadable, truncated or corrupt") and err.count("\n") == 1, err
    with pytest.raises(ConversionError, match="unreadable, truncated or corrupt"):
        load_model(bad)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(good.read_bytes()[:64])
    assert main(["inspect", str(bad_st)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad_st}: unreadable, truncated or corrupt") and err.count("\n") == 1, err
