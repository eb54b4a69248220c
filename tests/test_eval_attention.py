"""Attention maps: the plain path against a hand computation, rollout by hand, word merging, the CLI."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.interop.exported import save_checkpoint
from m3ae_engine.eval import attention as attn_cli
from m3ae_engine.eval.attention_maps import (attention_rollout, caption_words, encoder_attention, head_average,
                                             max_encoder_difference, resolve_layers, sample_maps)

# a toy WordPiece vocabulary for the hand-computed model
VOCAB = ["[PAD]", "[CLS]", "red", "square", "##s", "blue", "##ish", "[SEP]", "a", "cat"]


def _tiny_model(seed=0, **overrides):
    """2 layers, 2 heads of width 4, a 2x2 grid of 4x4 patches, 7 text positions; every parameter random
    (LayerNorm scales and biases too), so no term of the hand computation is trivially 0 or 1."""
    cfg = M3AEConfig(emb_dim=8, depth=2, num_heads=2, dec_emb_dim=8, dec_depth=1, dec_num_heads=2, mlp_ratio=2,
                     image_size=8, patch_size=4, text_length=7, vocab_size=len(VOCAB), **overrides)
    torch.manual_seed(seed)
    model = M3AE(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.7)
    return model


def _hand_encoder(model, image, text, pad):
    """The encoder written out with explicit matmuls in float64: (x [B, S, D], probs per layer [B, H, S, S])."""
    c = model.config
    f64 = lambda t: t.detach().double()  # noqa: E731
    with torch.no_grad():
        x = torch.cat([model.cls_token.expand(image.shape[0], 1, -1), model.embed_image(image),
                       model.embed_text(text)], 1).double()  # [B, 1 + Li + Lt, D]
    b, s, d = x.shape
    h, dh = c.num_heads, d // c.num_heads
    ignore = torch.cat([torch.zeros(b, 1 + c.num_patches, dtype=torch.bool), pad > 0], 1)  # [B, S] keys

    def layer_norm(t, ln):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + c.layer_norm_eps) * f64(ln.weight) + f64(ln.bias)

    def gelu_tanh(t):
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))

    probs_all = []
    for blk in model.encoder:
        qkv = layer_norm(x, blk.norm1) @ f64(blk.attn.qkv.weight).T + f64(blk.attn.qkv.bias)  # [B, S, 3D]
        heads_out, probs = [], torch.zeros(b, h, s, s, dtype=torch.float64)
        for i in range(b):
            for j in range(h):
                q = qkv[i, :, 0 * d + j * dh:0 * d + (j + 1) * dh]  # [S, Dh]: columns laid out [3][H][Dh]
                k = qkv[i, :, 1 * d + j * dh:1 * d + (j + 1) * dh]
                scores = (q @ k.T) / math.sqrt(dh)  # [S, S]
                scores[:, ignore[i]] = float("-inf")
                e = torch.exp(scores - scores.max(-1, keepdim=True).values)
                probs[i, j] = e / e.sum(-1, keepdim=True)
        for j in range(h):
            v = qkv[:, :, 2 * d + j * dh:2 * d + (j + 1) * dh]  # [B, S, Dh]
            heads_out.append(probs[:, j] @ v)
        x = x + torch.cat(heads_out, -1) @ f64(blk.attn.proj.weight).T + f64(blk.attn.proj.bias)
        hidden = gelu_tanh(layer_norm(x, blk.norm2) @ f64(blk.mlp.fc1.weight).T + f64(blk.mlp.fc1.bias))
        x = x + hidden @ f64(blk.mlp.fc2.weight).T + f64(blk.mlp.fc2.bias)
        probs_all.append(probs)
    return layer_norm(x, model.encoder_norm), probs_all


def _inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=g)
    # sample 0: [CLS] red blue ##ish square ##s [PAD]; sample 1: a cat [PAD] x5 (different padding per sample)
    text = torch.tensor([[1, 2, 5, 6, 3, 4, 0], [8, 9, 0, 0, 0, 0, 0]])
    pad = torch.tensor([[0, 0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    return image, text, pad


def test_plain_path_matches_hand_computation_and_forward_representation():
    model = _tiny_model()
    image, text, pad = _inputs()
    x, probs = encoder_attention(model, image, text, pad)
    x_hand, probs_hand = _hand_encoder(model, image, text, pad)
    assert len(probs) == 2 and probs[0].shape == (2, 2, 1 + 4 + 7, 1 + 4 + 7)
    for p, ph in zip(probs, probs_hand):
        torch.testing.assert_close(p.double(), ph, atol=1e-5, rtol=1e-5)
        assert float(p[0, :, :, -1].abs().max()) == 0.0 and float(p[1, :, :, 7:].abs().max()) == 0.0  # pads: no keys
    valid = torch.cat([torch.ones(2, 5, dtype=torch.bool), pad == 0], 1)
    torch.testing.assert_close(x.double()[valid], x_hand[valid], atol=1e-4, rtol=1e-4)
    ref = model.forward_representation(image, text, pad)
    torch.testing.assert_close(x[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert max_encoder_difference(model, x, image, text, pad) < 1e-5


def test_maps_and_rollout_against_hand_computation():
    model = _tiny_model(seed=1)
    image, text, pad = _inputs()
    _, probs = encoder_attention(model, image, text, pad)
    _, probs_hand = _hand_encoder(model, image, text, pad)
    mean = head_average(probs)  # [L, B, S, S]
    roll = attention_rollout(mean)
    # by hand: per layer the head mean, + I, rows renormalised, the top layer multiplied on the left
    a = [(ph[:, 0] + ph[:, 1]) / 2 for ph in probs_hand]  # [B, S, S]
    eye = torch.eye(a[0].shape[-1], dtype=torch.float64)
    a_hat = [(m + eye) / (m + eye).sum(-1, keepdim=True) for m in a]
    roll_hand = torch.stack([a_hat[1][i] @ a_hat[0][i] for i in range(2)])
    torch.testing.assert_close(roll.double(), roll_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(roll.sum(-1), torch.ones(2, 12), atol=1e-5, rtol=0)  # rows stay distributions

    words = caption_words(text[0].tolist(), pad[0].tolist(), VOCAB.__getitem__)
    assert words == [("red", [1]), ("blueish", [2, 3]), ("squares", [4, 5])]
    maps = sample_maps(mean, roll, 0, 4, [1, 0], words)
    assert maps.labels == ["[CLS]", "red", "blueish", "squares"] and maps.layers == [1, 0]
    assert maps.layer_maps.shape == (4, 2, 2, 2) and maps.rollout_maps.shape == (4, 2, 2)
    lt0 = 1 + 4  # token index of text position 0
    for r, rows in enumerate([[0], [lt0 + 1], [lt0 + 2, lt0 + 3], [lt0 + 4, lt0 + 5]]):
        for col, layer in enumerate([1, 0]):
            want = torch.stack([a[layer][0, q, 1:5] for q in rows]).mean(0).reshape(2, 2)  # patches, row-major
            np.testing.assert_allclose(maps.layer_maps[r, col], want.numpy(), atol=1e-6)
        want = torch.stack([roll_hand[0, q, 1:5] for q in rows]).mean(0).reshape(2, 2)
        np.testing.assert_allclose(maps.rollout_maps[r], want.numpy(), atol=1e-6)
    # sample 1 (more padding): its words and maps come from its own rows
    words1 = caption_words(text[1].tolist(), pad[1].tolist(), VOCAB.__getitem__)
    assert words1 == [("a", [0]), ("cat", [1])]
    m1 = sample_maps(mean, roll, 1, 4, [0], words1)
    np.testing.assert_allclose(m1.layer_maps[2, 0], a[0][1, lt0 + 1, 1:5].reshape(2, 2).numpy(), atol=1e-6)


def test_image_only_path_and_other_backends_give_the_same_maps():
    model = _tiny_model(seed=2)
    image, text, pad = _inputs()
    x, probs = encoder_attention(model, image)  # image only: [CLS, patches]
    assert probs[0].shape == (2, 2, 5, 5)
    torch.testing.assert_close(x, model.forward_representation(image), atol=1e-5, rtol=1e-5)
    # whatever backend the model's own forward uses (padded or packed config), the plain path agrees with it
    x_ref, _ = encoder_attention(model, image, text, pad)
    for backend in ("sdpa", "math"):
        for packed in (True, False):
            model.config.attention, model.config.packed = backend, packed
            assert max_encoder_difference(model, x_ref, image, text, pad) < 1e-5, (backend, packed)


def test_caption_words_merging_rules():
    vocab = {0: "[PAD]", 1: "[CLS]", 2: "##ing", 3: "walk", 4: "[SEP]", 5: "##s", 6: "[UNK]"}
    ids = [3, 2, 5, 4, 2, 6, 3, 0]
    pad = [0, 0, 0, 0, 0, 0, 0, 1]
    assert caption_words(ids, pad, vocab.__getitem__) == [("walkings", [0, 1, 2]), ("##ing", [4]), ("[UNK]", [5]),
                                                          ("walk", [6])]
    assert caption_words([3, 3], [1, 1], vocab.__getitem__) == []  # all padding
    # the real WordPiece tokenizer: pieces merge back into the caption's words
    from m3ae_engine.model.tokenizer import default_tokenizer
    tok = default_tokenizer(16)
    ids, pad = tok.encode_batch(["Tokenization of snowboarders"])
    words = caption_words(ids[0].tolist(), pad[0].tolist(), tok.id_to_token)
    assert [w for w, _ in words] == ["tokenization", "of", "snowboarders"]
    assert len(words[0][1]) == 2 and len(words[2][1]) == 3


def test_resolve_layers():
    assert resolve_layers("-1", 4) == [3]
    assert resolve_layers("0, 2,-1", 4) == [0, 2, 3]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("1,-3", 4) == [1]  # the same layer twice is drawn once
    for bad in ("4", "-5", "x", ""):
        with pytest.raises(ValueError, match="--layers"):
            resolve_layers(bad, 4)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn")
    torch.manual_seed(0)
    cfg = M3AEConfig.from_preset("tiny")
    save_checkpoint(M3AE(cfg).state_dict(), cfg, root / "ckpt")
    # the same weights as a run trained with a fused attention backend this machine may lack
    fused = M3AEConfig.from_preset("tiny", attention="flash_attn")
    save_checkpoint(M3AE(cfg).state_dict(), fused, root / "ckpt_flash")
    return root


def _png_ok(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_cli_synthetic_writes_pngs_npz_and_html(ckpt, capsys):
    out = ckpt / "out_syn"
    assert attn_cli.main(["--checkpoint", str(ckpt / "ckpt"), "--synthetic", "2", "--layers", "0,-1",
                          "--output-dir", str(out)]) == 0
    from m3ae_engine.interop.load import load_model
    from m3ae_engine.eval.reconstruct import samples_synthetic
    from m3ae_engine.model.tokenizer import default_tokenizer
    model, _ = load_model(ckpt / "ckpt")
    page = (out / "index.html").read_text()
    meta = json.loads((out / "attention.json").read_text())
    for i, (image, caption) in enumerate(samples_synthetic(2, 32)):
        _png_ok(out / f"sample_{i:03d}.png")
        assert f'src="sample_{i:03d}.png"' in page and caption in page
        saved = np.load(out / f"sample_{i:03d}.npz")
        want, diff = attn_cli.attention_maps(model, image, caption, [0, 1], default_tokenizer(32))
        assert list(saved["labels"]) == want.labels == ["[CLS]"] + caption.split()
        np.testing.assert_allclose(saved["layer_maps"], want.layer_maps, atol=1e-6)
        np.testing.assert_allclose(saved["rollout_maps"], want.rollout_maps, atol=1e-6)
        assert saved["layer_maps"].shape == (1 + len(caption.split()), 2, 4, 4)
        assert meta["samples"][i]["difference"] < 1e-3 and diff < 1e-3
    assert not list(out.glob("*.tmp"))


def test_cli_image_and_caption_with_a_fused_backend_checkpoint(ckpt, tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out"
    rc = attn_cli.main(["--checkpoint", str(ckpt / "ckpt_flash"), "--image", str(img), "--caption",
                        "Tokenization of snowboarders [SEP]", "--output-dir", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    saved = np.load(out / "sample_000.npz")
    assert list(saved["labels"]) == ["[CLS]", "tokenization", "of", "snowboarders"]
    assert list(saved["layers"]) == [1] and saved["layer_maps"].shape == (4, 1, 4, 4)
    # rows of the maps are shares of one softmax row: non-negative, at most 1 in all
    assert (saved["layer_maps"] >= 0).all() and (saved["layer_maps"].sum((-1, -2)) <= 1 + 1e-6).all()
    _png_ok(out / "sample_000.png")
    assert "snowboarders" in (out / "index.html").read_text()


def _one_line_error(capsys, argv, match):
    assert attn_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    good = str(ckpt / "ckpt")
    bad_img = tmp_path / "broken.jpg"
    bad_img.write_bytes(b"not a jpeg at all")
    ok_img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(ok_img)
    out = str(tmp_path / "o")
    _one_line_error(capsys, ["--checkpoint", str(tmp_path / "nope"), "--synthetic", "1", "--output-dir", out],
                    "checkpoint not found")
    _one_line_error(capsys, ["--checkpoint", good, "--image", str(bad_img), "--caption", "a cat", "--output-dir", out],
                    "cannot read image")
    _one_line_error(capsys, ["--checkpoint", good, "--image", str(tmp_path / "missing.jpg"), "--caption", "a cat",
                             "--output-dir", out], "file not found")
    _one_line_error(capsys, ["--checkpoint", good, "--image", str(ok_img), "--caption", "  ", "--output-dir", out],
                    "--caption is empty")
    _one_line_error(capsys, ["--checkpoint", good, "--synthetic", "1", "--layers", "2", "--output-dir", out],
                    "layer 2 is out of range, the encoder has 2 layers")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


def test_cli_without_matplotlib_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    _one_line_error(capsys, ["--checkpoint", str(ckpt / "ckpt"), "--synthetic", "1", "--output-dir",
                             str(tmp_path / "o")], "matplotlib, which is not installed")
    assert not (tmp_path / "o").exists()


def test_cli_shards_sample_without_caption_gets_cls_maps_only(ckpt, tmp_path, capsys):
    import io
    import tarfile
    from m3ae_engine.data.synthetic import make_sample
    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(2):
            img, cap = make_sample(i, 5, 40)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            files = [(f"{i:06d}.png", buf.getvalue())] + ([(f"{i:06d}.txt", cap.encode())] if i == 0 else [])
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert attn_cli.main(["--checkpoint", str(ckpt / "ckpt"), "--shards", str(tmp_path / "s-*.tar"),
                          "--layers", "all", "--output-dir", str(out)]) == 0, capsys.readouterr().err
    with_caption, without = np.load(out / "sample_000.npz"), np.load(out / "sample_001.npz")
    assert list(with_caption["labels"]) == ["[CLS]"] + make_sample(0, 5, 40)[1].split()
    assert list(without["labels"]) == ["[CLS]"] and without["layer_maps"].shape == (1, 2, 4, 4)
    assert "no caption: CLS only" in (out / "index.html").read_text()
    _png_ok(out / "sample_001.png")


def test_overlay_tile_puts_each_patch_where_it_lies():
    import matplotlib
    cmap = matplotlib.colormaps["inferno"]
    image = np.full((8, 8, 3), 100, np.uint8)
    grid = np.zeros((2, 2), np.float32)
    grid[0, 1] = 0.3  # patch 1 of a 2x2 grid: top right
    grid[1, 0] = 0.15
    tile = attn_cli.overlay_tile(image, grid, cmap).astype(np.float32)
    blend = lambda v: attn_cli.ALPHA * np.round(np.array(cmap(v)[:3]) * 255) + (1 - attn_cli.ALPHA) * 100  # noqa: E731
    np.testing.assert_allclose(tile[0:4, 4:8], np.broadcast_to(blend(1.0), (4, 4, 3)), atol=0.51)  # max -> top
    np.testing.assert_allclose(tile[4:8, 0:4], np.broadcast_to(blend(0.5), (4, 4, 3)), atol=0.51)
    np.testing.assert_allclose(tile[0:4, 0:4], np.broadcast_to(blend(0.0), (4, 4, 3)), atol=0.51)


def test_cli_refuses_maps_when_the_plain_path_disagrees_with_the_model(ckpt, tmp_path, capsys, monkeypatch):
    real = attn_cli.encoder_attention

    def drifted(*args, **kwargs):  # a plain path that no longer computes what the model computes
        x, probs = real(*args, **kwargs)
        return x + 0.01, probs

    monkeypatch.setattr(attn_cli, "encoder_attention", drifted)
    _one_line_error(capsys, ["--checkpoint", str(ckpt / "ckpt"), "--synthetic", "1", "--output-dir",
                             str(tmp_path / "o")], "differs from forward_representation's")
    assert not list((tmp_path / "o").glob("*.png"))
