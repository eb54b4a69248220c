import pytest

from m3ae_engine import ConfigError, M3AE, M3AEConfig
from m3ae_engine.model.config import ENCODER_PRESETS


@pytest.mark.parametrize("name,dims", [("small", (384, 12, 6)), ("base", (768, 12, 12)),
                                       ("large", (1024, 24, 16)), ("huge", (1280, 32, 16))])
def test_presets_match_official_dimensions(name, dims):
    c = M3AEConfig.from_preset(name)
    assert (c.emb_dim, c.depth, c.num_heads) == dims
    assert (c.dec_emb_dim, c.dec_depth, c.dec_num_heads, c.mlp_ratio) == (512, 8, 16, 4)
    assert (c.image_size, c.patch_size, c.num_patches, c.patch_dim) == (256, 16, 256, 768)
    assert (c.text_length, c.vocab_size) == (64, 30522)
    assert (c.image_keep, c.text_keep) == (64, 16)
    assert c.layer_norm_eps == 1e-6 and c.gelu == "tanh"


def test_overrides_and_round_trip():
    c = M3AEConfig.from_preset("tiny", image_mask_ratio=0.5, mask_sharing="batch")
    assert c.image_keep == int(c.num_patches * 0.5)
    assert M3AEConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("overrides,needle", [
    (dict(emb_dim=100, num_heads=3), "divisible by num_heads"),
    (dict(dec_emb_dim=30, dec_num_heads=4), "divisible by dec_num_heads"),
    (dict(image_size=30, patch_size=8), "divisible by patch_size"),
    (dict(image_mask_ratio=1.5), "image_mask_ratio must be in [0, 1]"),
    (dict(text_mask_ratio=-0.1), "text_mask_ratio must be in [0, 1]"),
    (dict(text_length=0), "text_length"),
    (dict(mask_sharing="token"), "mask_sharing"),
    (dict(gelu="relu"), "gelu"),
    (dict(kernels="cudnn"), "kernels"),
    (dict(depth=0), "depth must be a positive integer"),
    (dict(image_std=(0.1, 0.0, 0.1)), "image_std"),
    (dict(text_loss_weight=-1.0), "text_loss_weight"),
    (dict(image_mask_ratio=0.0), "masks none of the 16 image patches"),
    (dict(image_mask_ratio=1e-17), "set image_all_token_loss"),  # 1 - 1e-17 == 1.0: keeps all 16
    (dict(output_head_depth=-1), "output_head_depth must be an integer >= 0"),
    (dict(image_all_token_loss=1), "image_all_token_loss must be true or false"),
])
def test_validation_errors_are_clear(overrides, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        M3AEConfig.from_preset("tiny", **overrides)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        M3AEConfig.from_preset("gigantic")
    for name in ENCODER_PRESETS:
        assert name in str(e.value)


def test_unknown_field():
    with pytest.raises(ConfigError, match="unknown M3AEConfig field"):
        M3AEConfig.from_preset("tiny", widht=3)


@pytest.mark.parametrize("name", list(ENCODER_PRESETS))
def test_every_preset_builds_on_meta(name):
    import torch
    c = M3AEConfig.from_preset(name)
    with torch.device("meta"):
        m = M3AE(c)
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    d = c.emb_dim
    assert n_enc == c.depth * (12 * d * d + 13 * d)  # qkv+proj+fc1+fc2 weights and biases, 2 LayerNorms
    assert m.decoder_text_output.weight.shape == (c.vocab_size, c.dec_emb_dim)
    assert m.decoder_image_output.weight.shape == (c.patch_dim, c.dec_emb_dim)
