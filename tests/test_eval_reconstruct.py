"""Reconstruction grids (PNG) and caption pages (HTML)."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.interop.exported import save_checkpoint
from m3ae_engine.eval import reconstruct as rec
from m3ae_engine.eval.reconstruct import expand_braces, reconstruct, samples_from_shards
from m3ae_engine.ops.reference import patchify
from m3ae_engine.model.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    torch.manual_seed(0)
    cfg = M3AEConfig.from_preset("tiny")
    save_checkpoint(M3AE(cfg).state_dict(), cfg, root / "ckpt")
    return root


def _check_png(path, rows, cell):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert w == 4 * cell + 5 * 2 and h == rows * cell + (rows + 1) * 2
    return np.asarray(Image.open(path).convert("RGB"))


def test_reconstruct_synthetic_writes_png_and_html(ckpt, capsys):
    out = ckpt / "out_syn"
    assert rec.main(["--checkpoint", str(ckpt / "ckpt"), "--synthetic", "3", "--output-dir", str(out)]) == 0
    grid = _check_png(out / "reconstructions.png", 3, 32 * 4)  # tiny 32 px images upscaled x4
    # first column is the original synthetic image (nearest upscale)
    from m3ae_engine.data.synthetic import make_sample
    orig = make_sample(0, 0, 32)[0]
    np.testing.assert_array_equal(grid[2:2 + 128:4, 2:2 + 128:4], orig)
    page = (out / "index.html").read_text()
    assert "reconstructions.png" in page and "[MASK]" in page
    assert 'class="ok"' in page or 'class="bad"' in page  # predictions are marked right / wrong
    assert make_sample(0, 0, 32)[1].split()[1] in page  # the caption is shown
    meta = json.loads((out / "reconstructions.json").read_text())
    assert len(meta["image_mse_per_sample"]) == 3 and meta["text loss"] is not None


def test_reconstruct_panels_are_consistent(ckpt):
    from m3ae_engine.interop.load import load_model
    model, _ = load_model(ckpt / "ckpt")
    c = model.config
    from m3ae_engine.eval.reconstruct import samples_synthetic
    samples = samples_synthetic(2, c.image_size)
    images = torch.stack([s[0] for s in samples])
    res = reconstruct(model, images, [s[1] for s in samples], seed=1)
    p = res["panels"]
    text, pad = default_tokenizer(c.text_length).encode_batch([s[1] for s in samples])
    out = model(images, text, pad, generator=torch.Generator().manual_seed(1))
    mask = out.image_mask.bool()  # [B, L] same seed -> same mask
    vis = ~mask
    pasted, orig, masked_in = (patchify(p[k].float(), c.patch_size) for k in ("pasted", "original", "masked"))
    # visible patches: pasted == original (up to uint8 round trip), masked patches: pasted == reconstruction
    assert (pasted[vis] - orig[vis]).abs().max() <= 1
    recon = patchify(p["reconstruction"].float(), c.patch_size)
    assert torch.equal(pasted[mask], recon[mask])
    assert (masked_in[vis] - orig[vis]).abs().max() <= 1
    assert int(mask.sum()) == 2 * (c.num_patches - c.image_keep)
    # text: exactly the masked, non-padded words have predictions
    n_masked = sum(t["masked"] for toks in res["texts"] for t in toks)
    assert n_masked == int((out.text_row_weight > 0).sum())


def _write_shard(path, n):
    from m3ae_engine.data.synthetic import make_sample
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            img, cap = make_sample(i, 3, 40)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG")
            for name, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_reconstruct_from_shards_and_folder(ckpt, capsys):
    _write_shard(ckpt / "s-000.tar", 2)
    _write_shard(ckpt / "s-001.tar", 2)
    assert expand_braces(str(ckpt / "s-{000..001}.tar")) == [str(ckpt / "s-000.tar"), str(ckpt / "s-001.tar")]
    got = samples_from_shards(str(ckpt / "s-{000..001}.tar"), 3, 32)
    assert len(got) == 3 and got[0][0].shape == (3, 32, 32) and got[0][1]
    out = ckpt / "out_shards"
    assert rec.main(["--checkpoint", str(ckpt / "ckpt"), "--shards", str(ckpt / "s-*.tar"), "--num-samples", "4",
                     "--output-dir", str(out), "--scale", "2"]) == 0
    _check_png(out / "reconstructions.png", 4, 64)
    folder = ckpt / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(folder / "a.png")
    (folder / "a.txt").write_text("a gray picture")
    Image.fromarray(np.full((30, 20, 3), 200, np.uint8)).save(folder / "b.png")
    out = ckpt / "out_folder"
    assert rec.main(["--checkpoint", str(ckpt / "ckpt"), "--folder", str(folder), "--output-dir", str(out),
                     "--image-only"]) == 0
    _check_png(out / "reconstructions.png", 2, 128)
    assert "[MASK]" not in (out / "index.html").read_text()
    assert rec.main(["--checkpoint", str(ckpt / "ckpt"), "--shards", str(ckpt / "none-*.tar")]) == 2
    assert "no shards match" in capsys.readouterr().err
