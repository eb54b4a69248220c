"""Export of the encoder to a timm VisionTransformer state dict."""
import json

import pytest
import torch
import torch.nn.functional as F

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.interop.cli import main
from m3ae_engine.interop.exported import save_checkpoint
from m3ae_engine.interop.timm_export import timm_model_spec, to_timm_state_dict
from m3ae_engine.ops.reference import normalize_image

from test_convert import _torch_timm_block


def _model(gelu="tanh", use_type_embedding=True):
    torch.manual_seed(0)
    cfg = M3AEConfig.from_preset("tiny", gelu=gelu, use_type_embedding=use_type_embedding)
    model = M3AE(cfg).eval()
    with torch.no_grad():  # make every parameter matter (type embedding, biases, LN affine)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


def _timm_style_forward(tsd, cfg, x):
    """timm VisionTransformer.forward_features + token pool, written from timm's semantics."""
    h = F.conv2d(x, tsd["patch_embed.proj.weight"], tsd["patch_embed.proj.bias"], stride=cfg.patch_size)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([tsd["cls_token"].expand(x.shape[0], -1, -1), h], 1) + tsd["pos_embed"]
    for i in range(cfg.depth):
        h = _torch_timm_block(h, {k[len(f"blocks.{i}."):]: v for k, v in tsd.items() if k.startswith(f"blocks.{i}.")},
                              cfg.num_heads, "tanh" if cfg.gelu == "tanh" else "none")
    h = F.layer_norm(h, (cfg.emb_dim,), tsd["norm.weight"], tsd["norm.bias"], 1e-6)
    return h[:, 0]


@pytest.mark.parametrize("gelu,type_emb", [("tanh", True), ("exact", False)])
def test_timm_layout_gives_same_cls_features(gelu, type_emb):
    model, cfg = _model(gelu, type_emb)
    tsd = to_timm_state_dict(model.state_dict(), cfg)
    assert tsd["pos_embed"].shape == (1, 1 + cfg.num_patches, cfg.emb_dim)
    assert torch.all(tsd["pos_embed"][0, 0] == 0)
    assert tsd["patch_embed.proj.weight"].shape == (cfg.emb_dim, 3, cfg.patch_size, cfg.patch_size)
    img = torch.randint(0, 256, (3, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    want = model.forward_representation(img)[:, 0]
    with torch.no_grad():
        got = _timm_style_forward(tsd, cfg, normalize_image(img, cfg.image_mean, cfg.image_std))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.timm
def test_timm_vision_transformer_loads_export_and_matches(tmp_path):
    import timm
    from timm.models.vision_transformer import VisionTransformer
    model, cfg = _model()
    save_checkpoint(model.state_dict(), cfg, tmp_path / "ckpt")
    assert main(["to-timm", str(tmp_path / "ckpt"), str(tmp_path / "timm" / "vit.safetensors")]) == 0
    from safetensors.torch import load_file
    tsd = load_file(str(tmp_path / "timm" / "vit.safetensors"))
    spec = json.loads((tmp_path / "timm" / "timm_config.json").read_text())
    assert spec == json.loads(json.dumps(timm_model_spec(cfg)))
    kw = dict(spec["kwargs"])
    kw["act_layer"] = timm.layers.get_act_layer(kw["act_layer"])
    vit = VisionTransformer(num_classes=0, **kw).eval()
    vit.load_state_dict(tsd, strict=True)  # every key of the ViT, nothing extra
    img = torch.randint(0, 256, (2, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    with torch.no_grad():
        got = vit(normalize_image(img, cfg.image_mean, cfg.image_std))
    torch.testing.assert_close(got, model.forward_representation(img)[:, 0], rtol=1e-4, atol=1e-4)


def test_cli_to_timm_and_inspect(tmp_path, capsys):
    model, cfg = _model()
    save_checkpoint(model.state_dict(), cfg, tmp_path / "ckpt")
    assert main(["to-timm", str(tmp_path / "ckpt"), str(tmp_path / "t" / "vit.pth")]) == 0
    saved = torch.load(str(tmp_path / "t" / "vit.pth"), weights_only=True)["model"]
    want = to_timm_state_dict(model.state_dict(), cfg)
    assert set(saved) == set(want) and all(torch.equal(saved[k], want[k]) for k in want)
    spec = json.loads((tmp_path / "t" / "timm_config.json").read_text())
    assert spec["kwargs"]["act_layer"] == "gelu_tanh" and spec["kwargs"]["img_size"] == cfg.image_size
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    assert "tensors converted" in capsys.readouterr().out
    assert main(["to-timm", str(tmp_path / "nothing"), str(tmp_path / "x.pth")]) == 2
