"""Official M3AE checkpoints in and out: the file m3ae_main.py writes (cloudpickle, whole train state, optax
functions by value) read without flax/optax and without running its code; the model config from its flags
(`variant`) as the official get_default_config resolves them; the pickle torch-to-m3ae writes read by the
official load path (re-implemented below from m3ae/utils.py, finetune_main.py, linear_main.py)."""
import importlib
import json
import pickle
import sys

import numpy as np
import pytest
import torch

from m3ae_engine.model.config import CC12M_MEAN
from m3ae_engine.interop.cli import main
from m3ae_engine.interop.load import load_model, read_checkpoint
from m3ae_engine.interop.official import config_from_official, resolve_official_config
from m3ae_engine.interop.report import ConversionError, flatten_tree
from m3ae_engine.interop.official_pickle import read_official_checkpoint
from m3ae_engine.interop.official_flags import fields_from_variant, variant_from_config

from official_helpers import (D, DD, DDEPTH, DEPTH, DHEADS, HEADS, IMG, LT, P, V, install_fake_modules,
                              np_gelu_tanh, np_layernorm, official_tree,
                              official_variant, remove_fake_modules, write_m3ae_main_checkpoint)


@pytest.fixture
def payload(tmp_path, monkeypatch):
    """(marker file, a module whose import creates the marker), the module importable from tmp_path."""
    marker = tmp_path / "PAYLOAD_RAN"
    name = f"m3ae_payload_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\ndef touch():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    marker.unlink()  # importing it here (to pickle it) created the marker
    yield marker, module
    sys.modules.pop(name, None)
    remove_fake_modules()


def write_official(tmp_path, payload, variant=None, tree=None, **kw):
    marker, module = payload
    tree = tree if tree is not None else official_tree(np.random.default_rng(0))
    path = write_m3ae_main_checkpoint(tmp_path / "model.pkl", tree, official_variant() if variant is None else variant,
                                      marker, module, **kw)
    sys.modules.pop(module.__name__)  # a fresh process: the payload module is importable but not imported
    return path, tree


@pytest.mark.parametrize("frozen", [False, True])
def test_m3ae_main_checkpoint_converts_without_running_code(tmp_path, payload, capsys, frozen):
    marker, _ = payload
    path, tree = write_official(tmp_path, payload, frozen_params=frozen)
    for mod in ("flax", "jax", "optax", "m3ae", "m3ae.model", "optax._src.base"):
        assert mod not in sys.modules  # nothing of the training stack to import
    assert main(["m3ae-to-torch", str(path), str(tmp_path / "conv")]) == 0  # every setting from the variant
    assert not marker.exists()
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    want = dict(emb_dim=D, depth=DEPTH, num_heads=HEADS, dec_emb_dim=DD, dec_depth=DDEPTH, dec_num_heads=DHEADS,
                image_size=IMG, patch_size=P, text_length=LT, vocab_size=V, mask_sharing="batch",
                image_mask_ratio=0.6, text_mask_ratio=0.5, text_loss_weight=0.3, image_loss_weight=1.0,
                unpaired_text_loss_weight=0.0, gelu="tanh", layer_norm_eps=1e-6, use_type_embedding=True,
                image_mean=list(CC12M_MEAN))
    assert {k: cfg[k] for k in want} == want
    model, report = load_model(tmp_path / "conv")
    assert report.ok
    torch.testing.assert_close(model.encoder[1].mlp.fc2.weight,
                               torch.from_numpy(tree["encoder"]["Block_1"]["TransformerMLP_0"]["fc2"]["kernel"].T))
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step 20, epoch 1" in out and "m3ae.text_mask_ratio=0.5" in out
    assert "state.opt_state: " in out and "state.tx: " in out and "inert stand-ins" in out
    assert "cloudpickle.cloudpickle._make_function" in out  # the optax functions, stored by value, never built
    assert not marker.exists()
    # control: the standard loader, given the modules, does run the planted code
    import cloudpickle
    install_fake_modules()
    with open(path, "rb") as f:
        cloudpickle.load(f)
    assert marker.exists()


def test_inspect_lists_optimizer_state_and_payloads_inertly(tmp_path, payload):
    path, tree = write_official(tmp_path, payload)
    ckpt = read_official_checkpoint(path)
    assert ckpt.step == 20 and ckpt.epoch == 1 and ckpt.params_at == "state.params['params']"
    assert ckpt.variant["m3ae.num_heads"] == HEADS
    flat, want = flatten_tree(ckpt.params), flatten_tree(tree)
    assert flat.keys() == want.keys() and all(np.array_equal(flat[k], want[k]) for k in want)
    lines = "\n".join(ckpt.other)
    n_params = len(want)
    assert f"state.opt_state: {2 * n_params + 2} arrays" in lines  # mu, nu and two counts
    assert "planted: 2 inert stand-ins (builtins.exec, io.open)" in lines  # the payloads, never called
    assert not payload[0].exists()


def test_preset_overrides_stale_dims_as_official_get_default_config():
    v = official_variant(**{"m3ae.model_type": "base"})  # m3ae.emb_dim etc. stay at the tiny values: stale
    fields, origin, notes = fields_from_variant(v)
    assert (fields["emb_dim"], fields["depth"], fields["num_heads"], fields["dec_emb_dim"],
            fields["dec_num_heads"]) == (768, 12, 12, 512, 16)
    assert origin["emb_dim"] == "m3ae.model_type='base'" and any("overridden" in n for n in notes)
    # ... and the tensors must agree: a tiny tree under the 'small' preset is a one-line error
    flat = flatten_tree(official_tree(np.random.default_rng(1)))
    with pytest.raises(ConversionError, match=r"m3ae.model_type='small' gives emb_dim=384, but cls_token says 32"):
        config_from_official(flat, official_variant(**{"m3ae.model_type": "small"}))
    with pytest.raises(ConversionError, match="not an official preset"):
        config_from_official(flat, official_variant(**{"m3ae.model_type": "giant"}))
    # mae_main.py's flags use the prefix mae.
    mae = {k.replace("m3ae.", "mae."): x for k, x in official_variant().items()}
    assert fields_from_variant(mae)[0]["num_heads"] == HEADS


def test_variant_against_shapes_and_missing_fields_are_one_line_errors(tmp_path, capsys):
    tree = official_tree(np.random.default_rng(2))
    flat = flatten_tree(tree)
    with pytest.raises(ConversionError, match=r"m3ae.depth gives depth=3, but the encoder/Block_\* count says 2"):
        config_from_official(flat, official_variant(**{"m3ae.depth": 3}))
    with pytest.raises(ConversionError, match="discretized_image"):
        config_from_official(flat, official_variant(discretized_image=True))
    v = official_variant()
    del v["m3ae.num_heads"], v["data.image_size"]
    with pytest.raises(ConversionError) as e:
        config_from_official(flat, v)
    msg = str(e.value)
    assert "\n" not in msg and "--num-heads N" in msg and "--image-size N" in msg and "--text-length" not in msg
    # no variant at all (a bare tree): the four fields the shapes cannot show are asked for (inspect still
    # describes the file)
    with pytest.raises(ConversionError, match="pass --num-heads N --dec-num-heads N --image-size N --text-length N"):
        config_from_official(flat)
    (tmp_path / "bare.pkl").write_bytes(pickle.dumps({"params": tree}))
    assert main(["inspect", str(tmp_path / "bare.pkl")]) == 2
    out, err = capsys.readouterr()
    assert "no variant (run flags)" in out and "--num-heads N" in err and err.count("\n") == 1
    cfg, notes = resolve_official_config(flat, None, num_heads=HEADS, dec_num_heads=DHEADS, image_size=IMG,
                                         text_length=LT)
    assert (cfg.text_loss_weight, cfg.image_mask_ratio, cfg.mask_sharing) == (0.1, 0.75, "batch")  # official
    assert any("official defaults used" in n and "text_loss_weight=0.1" in n for n in notes)


def test_flags_override_the_variant(tmp_path, payload, capsys):
    path, _ = write_official(tmp_path, payload)
    assert main(["m3ae-to-torch", str(path), str(tmp_path / "o"), "--mask-sharing", "sample",
                 "--text-loss-weight", "0.5", "--text-mask-ratio", "0.25"]) == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["mask_sharing"], cfg["text_loss_weight"], cfg["text_mask_ratio"], cfg["image_mask_ratio"]) == \
        ("sample", 0.5, 0.25, 0.6)
    assert "replaces the checkpoint's m3ae.text_mask_ratio" in capsys.readouterr().out


def test_broken_official_files_give_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "trunc.pkl"
    good = official_tree(np.random.default_rng(3))
    blob = pickle.dumps({"step": 1, "state": {"params": {"params": good}}})
    bad.write_bytes(blob[: len(blob) // 2])
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a readable pickle" in err and err.count("\n") == 1
    good["encoder"]["Block_0"]["LayerNorm_0"]["scale"] = "not an array"
    (tmp_path / "str.pkl").write_bytes(pickle.dumps({"state": {"params": {"params": good}}}))
    assert main(["m3ae-to-torch", str(tmp_path / "str.pkl"), str(tmp_path / "x"), "--num-heads", "4"]) == 2
    assert "encoder/Block_0/LayerNorm_0/scale is a str, not a float array" in capsys.readouterr().err
    (tmp_path / "none.pkl").write_bytes(pickle.dumps({"step": 1, "weights": [1, 2]}))
    assert main(["inspect", str(tmp_path / "none.pkl")]) == 2
    assert "no official M3AE parameter tree" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# torch -> official
# ------------------------------------------------------------------------------------------------------
def official_load_pretrained(path, backbone_keys):
    """What the official code does with a --load_pretrained file: utils.load_checkpoint (cloudpickle.load
    = pickle.load, then logs data['step'] with %d), then finetune_main.py takes
    data['state'].params['params'] and linear_main.py asserts every backbone key is in it."""
    with open(path, "rb") as fin:
        data = pickle.load(fin)
    "Loading checkpoint from %s, saved at step %d" % (path, data["step"])
    checkpoint_params = data["state"].params["params"]
    for key in backbone_keys:
        assert key in checkpoint_params.keys(), f"pretrained model miss key={key}"
    return data, checkpoint_params


def test_torch_to_m3ae_is_read_by_the_official_load_path(tmp_path, payload, capsys):
    path, tree = write_official(tmp_path, payload)
    assert main(["m3ae-to-torch", str(path), str(tmp_path / "conv")]) == 0
    assert main(["torch-to-m3ae", str(tmp_path / "conv"), str(tmp_path / "back.pkl")]) == 0
    assert "no optimizer state" in capsys.readouterr().out
    # MaskedAutoencoder's parameters (the backbone of finetune/linear) are a subset of the M3AE tree
    mae_keys = ["image_embedding", "encoder_image_type_embedding", "decoder_image_type_embedding", "cls_token",
                "image_mask_embedding", "encoder", "decoder", "decoder_input_projection", "decoder_image_output"]
    data, params = official_load_pretrained(tmp_path / "back.pkl", mae_keys)
    flat, want = flatten_tree(params), flatten_tree(tree)
    assert flat.keys() == want.keys()
    for k in want:
        assert flat[k].dtype == np.float32 and np.array_equal(flat[k], want[k]), k
    assert set(data) == {"step", "epoch", "variant", "state"}
    # the flags written describe the same model: reading it back gives the same config
    back_cfg = read_checkpoint(tmp_path / "back.pkl")[1]
    assert back_cfg == read_checkpoint(tmp_path / "conv")[1]
    assert data["variant"]["m3ae.num_heads"] == HEADS and data["variant"]["data.image_size"] == IMG


def test_variant_round_trip_and_unrepresentable_configs():
    from m3ae_engine import M3AEConfig
    cfg = M3AEConfig(emb_dim=D, depth=DEPTH, num_heads=HEADS, dec_emb_dim=DD, dec_depth=DDEPTH,
                     dec_num_heads=DHEADS, image_size=IMG, patch_size=P, text_length=LT, vocab_size=V,
                     image_mean=(0.25, 0.5, 0.75), image_std=(0.5, 0.5, 0.5), mask_sharing="batch",
                     image_loss_weight=0.7, text_loss_weight=0.2)
    variant, notes = variant_from_config(cfg)
    assert variant["data.image_normalization"] == "custom" and variant["data.custom_image_mean"] == "0.25-0.5-0.75"
    fields = fields_from_variant(variant)[0]
    for k, v in fields.items():  # (fields the config lacks are written with their official off value)
        assert getattr(cfg, k, False) == v, k
    assert not notes
    with pytest.raises(ValueError, match="gelu='exact'"):
        variant_from_config(M3AEConfig.from_preset("tiny", gelu="exact"))


# ------------------------------------------------------------------------------------------------------
# official MLP output heads (m3ae.output_head_depth > 0)
# ------------------------------------------------------------------------------------------------------
def np_official_mlp_head(h, x):
    """m3ae/model.py `MLP(hidden_dim=Dd, output_dim, depth=k, input_norm=k > 0)` in float64:
    LayerNorm_0, then per layer Dense_i -> gelu (tanh) -> LayerNorm_{i+1}, residual from the 2nd, Dense_k."""
    def ln(x, p):
        return np_layernorm(x, p["scale"], p["bias"])

    h = {k: {n: np.float64(a) for n, a in v.items()} for k, v in h.items()}
    depth = len([k for k in h if k.startswith("Dense_")]) - 1
    if depth > 0:
        x = ln(x, h["LayerNorm_0"])
    for i in range(depth):
        y = ln(np_gelu_tanh(x @ h[f"Dense_{i}"]["kernel"] + h[f"Dense_{i}"]["bias"]), h[f"LayerNorm_{i + 1}"])
        x = x + y if i > 0 else y
    return x @ h[f"Dense_{depth}"]["kernel"] + h[f"Dense_{depth}"]["bias"]


@pytest.mark.parametrize("head_depth", [1, 3])
def test_mlp_heads_convert_both_ways_and_match_the_official_formula(tmp_path, payload, head_depth):
    tree = official_tree(np.random.default_rng(4), head_depth=head_depth)
    path, _ = write_official(tmp_path, payload, variant=official_variant(**{"m3ae.output_head_depth": head_depth}),
                             tree=tree)
    assert main(["m3ae-to-torch", str(path), str(tmp_path / "conv")]) == 0
    model, report = load_model(tmp_path / "conv")
    assert report.ok and not report.not_converted and model.config.output_head_depth == head_depth
    x = np.random.default_rng(5).standard_normal((7, DD))
    with torch.no_grad():
        for name in ("decoder_image_output", "decoder_text_output"):
            got = getattr(model, name)(torch.from_numpy(x).float()).double().numpy()
            np.testing.assert_allclose(got, np_official_mlp_head(tree[name], x), rtol=1e-4, atol=1e-4)
    # and back: the official tree, bit for bit, with the depth in the flags
    assert main(["torch-to-m3ae", str(tmp_path / "conv"), str(tmp_path / "back.pkl")]) == 0
    data, params = official_load_pretrained(tmp_path / "back.pkl", ["decoder_image_output", "decoder_text_output"])
    flat, want = flatten_tree(params), flatten_tree(tree)
    assert flat.keys() == want.keys() and all(np.array_equal(flat[k], want[k]) for k in want)
    assert data["variant"]["m3ae.output_head_depth"] == head_depth


def test_head_depth_is_read_from_the_tensors_and_checked():
    flat = flatten_tree(official_tree(np.random.default_rng(6), head_depth=2))
    cfg = config_from_official(flat, official_variant(**{"m3ae.output_head_depth": 2}))
    assert cfg.output_head_depth == 2
    with pytest.raises(ConversionError, match=r"m3ae.output_head_depth gives output_head_depth=0, but the "
                                              r"Dense_\* count of decoder_image_output says 2"):
        config_from_official(flat, official_variant())
    del flat["decoder_text_output/Dense_2/kernel"], flat["decoder_text_output/Dense_2/bias"]
    with pytest.raises(ConversionError, match="the output heads differ in depth"):
        config_from_official(flat, official_variant(**{"m3ae.output_head_depth": 2}))
    # the all-token loss flags travel from the variant into the config
    flat = flatten_tree(official_tree(np.random.default_rng(7)))
    cfg = config_from_official(flat, official_variant(image_all_token_loss=True, text_all_token_loss=True))
    assert cfg.image_all_token_loss and cfg.text_all_token_loss


def test_mae_main_checkpoint_image_only(tmp_path, payload):
    """mae_main.py: MaskedAutoencoder tree (no text), flags `mae.*` and `imagenet_data.*` (dataset=imagenet)."""
    drop = ("m3ae.", "data.", "text_loss_weight", "unpaired_text_loss_weight", "text_all_token_loss")
    variant = {k: v for k, v in official_variant().items() if not k.startswith(drop)}
    variant.update({f"mae.{k[5:]}": v for k, v in official_variant().items()
                    if k.startswith("m3ae.") and k != "m3ae.text_mask_ratio"})
    variant.update({"dataset": "imagenet", "imagenet_data.image_size": IMG,
                    "imagenet_data.image_normalization": "imagenet", "cc12m_data.image_size": 256})
    tree = official_tree(np.random.default_rng(8), with_text=False)
    path, _ = write_official(tmp_path, payload, variant=variant, tree=tree)
    sd, cfg, report = read_checkpoint(path)
    assert report.ok and "text_embedding.weight" in report.not_converted
    assert (cfg.image_size, cfg.num_heads, cfg.image_mask_ratio) == (IMG, HEADS, 0.6)
    assert cfg.image_mean == (0.485, 0.456, 0.406) and cfg.mask_sharing == "batch"


class _OldStyle:  # pickled through copyreg._reconstructor with protocols 0 and 1
    def __init__(self):
        self.tree_note = "x"


@pytest.mark.parametrize("protocol", [0, 1, 2, 5])
def test_every_pickle_protocol_reads_inertly(tmp_path, protocol, monkeypatch):
    import os
    marker = tmp_path / "ran"

    class System:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    tree = official_tree(np.random.default_rng(9))
    path = tmp_path / f"p{protocol}.pkl"
    path.write_bytes(pickle.dumps({"step": 3, "state": {"params": {"params": tree}}, "old": _OldStyle(),
                                   "sys": System()}, protocol=protocol))
    ckpt = read_official_checkpoint(path)
    assert ckpt.step == 3 and np.array_equal(ckpt.params["cls_token"], tree["cls_token"])
    lines = "\n".join(ckpt.other)
    assert f"old: {_OldStyle.__module__}._OldStyle holding 1 inert stand-ins" in lines
    assert "sys: posix.system holding 1 inert stand-ins" in lines and not marker.exists()
