"""WebDataset loaders on the CPU: Pillow fallback (and DALI CPU when installed), ranks, resume, mix, errors."""
import io
import os

import numpy as np
import pytest
import torch

from m3ae_engine.data import (DataError, MixedLoader, PillowLoader, TextLoader, build_loader, dali_available,
                              expand_sources, mix_schedule)
from m3ae_engine.data.sources import expand_braces, read_index, scan_tar
from m3ae_engine.data.testdata import write_test_shards
from shard_helpers import plant
from m3ae_engine.model.tokenizer import default_tokenizer

B, S, L = 8, 32, 32
N = 24  # 2 shards x 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("wds")
    paths, caps = write_test_shards(str(d), num_shards=2, per_shard=12, grey=(3,), cmyk=(5,))
    return paths, caps, str(d)


def _key(k):
    return k.rsplit(":", 1)[1]


def _collect(loader):
    keys, batches = [], []
    for b in loader:
        keys += [_key(k) for k in b["key"]]
        batches.append(b)
    return keys, batches


def _check_batch(b, normalized=False):
    assert b["image"].shape == (B, 3, S, S)
    assert b["text"].shape == (B, L) and b["text"].dtype == torch.int64 and b["text"].device.type == "cpu"
    assert b["text_padding_mask"].shape == (B, L) and b["text_padding_mask"].dtype == torch.float32
    assert b["text_padding_mask"].device.type == "cpu"
    assert set(b["text_padding_mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(b["text_padding_mask"] == 1, b["text"] == 0)
    if normalized:
        assert b["image"].dtype == torch.float32
        assert -3.0 < float(b["image"].min()) < 0 < float(b["image"].max()) < 3.0
    else:
        assert b["image"].dtype == torch.uint8
        assert int(b["image"].max()) > 200 and int(b["image"].min()) < 60  # real image content, not blank


def test_patterns(shards):
    paths, _, d = shards
    assert expand_braces("x/{00000..00002}.tar") == ["x/00000.tar", "x/00001.tar", "x/00002.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_sources(os.path.join(d, "{00000..00001}.tar")) == paths
    assert expand_sources(os.path.join(d, "*.tar")) == paths
    assert expand_sources(paths) == paths


@pytest.mark.parametrize("decoder", ["cpu", "text"] + (["dali"] if dali_available() else []))
def test_worker_options_of_other_decoders_are_dropped_but_a_misspelt_option_is_an_error(shards, decoder):
    paths, _, _ = shards
    kw = dict(decoder="cpu" if decoder == "text" else decoder, device="cpu",
              modality="text" if decoder == "text" else "paired")
    build_loader(paths, B, S, L, num_workers=0, num_threads=1, shuffle_buffer=8, **kw)  # a run's one set
    with pytest.raises(TypeError, match="shufle"):
        build_loader(paths, B, S, L, shufle=False, **kw)


def test_errors_name_the_file(shards, tmp_path):
    paths, _, d = shards
    missing = os.path.join(d, "00007.tar")
    with pytest.raises(DataError, match="00007.tar"):
        build_loader([paths[0], missing], B, S, L, decoder="cpu")
    with pytest.raises(DataError, match="matches no file"):
        build_loader(os.path.join(str(tmp_path), "*.tar"), B, S, L, decoder="cpu")
    with pytest.raises(DataError, match="empty list"):
        build_loader([], B, S, L, decoder="cpu")
    trunc = tmp_path / "trunc.tar"
    data = open(paths[0], "rb").read()
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.tar") as e:
        build_loader(str(trunc), B, S, L, decoder="cpu")
    assert "truncated" in str(e.value)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="junk.tar"):
        build_loader(str(junk), B, S, L, decoder="cpu")
    # a stale index (tar rewritten shorter after indexing) is caught, naming both files
    stale = tmp_path / "stale.tar"
    stale.write_bytes(data)
    (tmp_path / "stale.idx").write_text(open(paths[0][:-4] + ".idx").read())
    stale.write_bytes(data[:4096] + b"\0" * 1024)
    os.utime(tmp_path / "stale.idx")
    with pytest.raises(DataError, match="stale.idx"):
        build_loader(str(stale), B, S, L, decoder="cpu")


def test_index_matches_tar(shards):
    paths, caps, _ = shards
    ix = read_index(paths[0][:-4] + ".idx", paths[0])
    scan = scan_tar(paths[0])
    assert ix.keys == scan.keys and ix.members == scan.members
    raw = open(paths[0], "rb").read()
    for key, mem in zip(ix.keys, ix.members):
        off, size = mem["txt"]
        assert raw[off:off + size].decode() == caps[key]
        off, size = mem["jpg"]
        assert raw[off:off + 3] == b"\xff\xd8\xff"


def test_pillow_batches_and_captions(shards):
    paths, caps, _ = shards
    loader = build_loader(paths, B, S, L, decoder="cpu", num_workers=0, epochs=1, device="cpu")
    assert loader.decoder == "cpu" and isinstance(loader, PillowLoader) and len(loader) == N // B
    keys, batches = _collect(loader)
    assert sorted(keys) == sorted(caps)  # one epoch = every sample once (grey-scale and CMYK included)
    tok = default_tokenizer(L)
    for b in batches:
        _check_batch(b)
        assert b["decoder"] == "cpu"
        for k, cap, ids in zip(b["key"], b["caption"], b["text"]):
            assert cap == caps[_key(k)]
            want = tok.decode(ids)
            assert want == " ".join(cap.split()[: len(want.split())])  # round trip (truncated at L)
            assert len(want.split()) == min(len(cap.split()), L) or (ids != 0).all()
    norm = next(iter(build_loader(paths, B, S, L, decoder="cpu", num_workers=0, normalize=True)))
    _check_batch(norm, normalized=True)
    assert loader.corrupt_count == 0


def test_grey_and_cmyk_become_rgb(shards):
    paths, _, _ = shards
    loader = build_loader(paths, 24, S, L, decoder="cpu", num_workers=0, epochs=1, shuffle=False,
                          random_crop=False, flip=False)
    b = next(iter(loader))
    keys = [_key(k) for k in b["key"]]
    grey = b["image"][keys.index("000000003")].float()
    assert (grey[0] - grey[1]).abs().max() <= 1 and (grey[1] - grey[2]).abs().max() <= 1
    cmyk = b["image"][keys.index("000000005")].float()
    assert cmyk.std() > 10  # decoded to a real RGB picture, not garbage or blank
    rgb = b["image"][keys.index("000000000")].float()
    assert (rgb[0] - rgb[2]).abs().max() > 20  # colour images keep colour


def test_workers_match_in_process(shards):
    paths, _, _ = shards
    a = build_loader(paths, B, S, L, decoder="cpu", num_workers=0, epochs=1, seed=3)
    b = build_loader(paths, B, S, L, decoder="cpu", num_workers=2, epochs=1, seed=3)
    xs, ys = list(a), list(b)
    assert len(xs) == len(ys) == N // B
    for x, y in zip(xs, ys):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])


def test_ranks_disjoint_and_cover(shards):
    paths, _, _ = shards
    seen = []
    for rank in range(2):
        loader = build_loader(paths, 4, S, L, decoder="cpu", num_workers=0, epochs=1, rank=rank, world_size=2,
                              seed=5)
        keys, _ = _collect(loader)
        assert len(keys) == N // 2
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == N
    # world size that does not divide N: every rank gets ceil(N / W), together they cover the set
    seen3 = [set(_collect(build_loader(paths, 1, S, L, decoder="cpu", num_workers=0, epochs=1, rank=r,
                                       world_size=5))[0]) for r in range(5)]
    assert all(len(s) == 5 for s in seen3) and len(set.union(*seen3)) == N


def test_resume_continues_with_next_unseen_sample(shards):
    paths, _, _ = shards
    kw = dict(decoder="cpu", num_workers=0, epochs=3, seed=11)
    full = list(build_loader(paths, 5, S, L, **kw))  # 3 epochs of 24, batches cross epoch boundaries
    a = build_loader(paths, 5, S, L, **kw)
    it = iter(a)
    for _ in range(6):  # 30 samples: into epoch 2
        next(it)
    state = a.state_dict()
    b = build_loader(paths, 5, S, L, **kw)
    b.load_state_dict(state)
    rest = list(b)
    assert len(rest) == len(full) - 6
    for x, y in zip(rest, full[6:]):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])
    keys = [k for b in full for k in b["key"]]
    assert keys[:N] != keys[N:2 * N] and sorted(keys[:N]) == sorted(keys[N:2 * N])  # epochs are re-shuffled
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(paths, 4, S, L, **kw).load_state_dict(state)


def test_corrupt_image_skipped_and_counted(tmp_path):
    paths, caps = write_test_shards(str(tmp_path), num_shards=1, per_shard=8, grey=(), cmyk=())
    # rewrite sample 2 with garbage image bytes
    bad = tmp_path / "bad.tar"
    plant(paths[0], bad, {"000000002.jpg": b"\xff\xd8\xff" + os.urandom(500)})
    loader = build_loader(str(bad), 8, S, L, decoder="cpu", num_workers=0, epochs=1, max_corrupt_fraction=1.0)
    with pytest.warns(RuntimeWarning, match="000000002"):
        batches = list(loader)
    assert len(batches) == 1 and batches[0]["image"].shape == (8, 3, S, S)
    assert loader.corrupt_count == 1 and loader.corrupt_samples[0].endswith(":000000002")
    # the slot now holds another sample: its image AND its caption, ids and key (pairs stay true)
    b = batches[0]
    assert not any(k.endswith(":000000002") for k in b["key"])
    i, j = [n for n, k in enumerate(b["key"]) if b["key"].count(k) == 2]  # the filled slot and its donor
    assert torch.equal(b["image"][i], b["image"][j]) and b["caption"][i] == b["caption"][j]
    assert torch.equal(b["text"][i], b["text"][j]) and torch.equal(b["text_padding_mask"][i],
                                                                     b["text_padding_mask"][j])


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_cpu(shards):
    paths, caps, _ = shards
    kw = dict(decoder="dali", device="cpu", num_threads=1, shuffle_buffer=16, seed=2)
    loader = build_loader(paths, B, S, L, epochs=1, **kw)
    assert loader.decoder == "dali" and len(loader) == N // B
    batches = list(loader)
    assert len(batches) == N // B
    tok = default_tokenizer(L)
    got = []
    for b in batches:
        _check_batch(b)
        for cap, ids in zip(b["caption"], b["text"]):
            assert cap in caps.values()
            assert tok.decode(ids) == " ".join(cap.split()[: len(tok.decode(ids).split())])
        got += b["caption"]
    assert sorted(got) == sorted(caps.values())  # an epoch covers the set
    _check_batch(next(iter(build_loader(paths, B, S, L, normalize=True, **kw))), normalized=True)
    # ranks: disjoint, covering
    per_rank = [sum((b["caption"] for b in build_loader(paths, 4, S, L, epochs=1, rank=r, world_size=2, **kw)),
                    []) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == N // 2
    assert sorted(per_rank[0] + per_rank[1]) == sorted(caps.values())
    # resume through DALI checkpointing: same images and captions as the uninterrupted run
    full = list(build_loader(paths, B, S, L, epochs=2, **kw))
    a = build_loader(paths, B, S, L, epochs=2, **kw)
    it = iter(a)
    next(it), next(it)
    b = build_loader(paths, B, S, L, epochs=2, **kw)
    b.load_state_dict(a.state_dict())
    rest = list(b)
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        assert x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])


def test_best_decoder_on_cpu():
    from m3ae_engine.data import best_decoder
    assert best_decoder("cpu") == ("dali" if dali_available() else "cpu")
    with pytest.raises(ValueError, match="decoder"):
        build_loader("x.tar", B, S, L, decoder="turbo")


def test_mix_schedule_proportions():
    ratios = {"paired": 0.6, "image": 0.25, "text": 0.15}
    tags = [mix_schedule(ratios, 0, s) for s in range(1000)]
    assert {t: tags.count(t) for t in ratios} == {"paired": 600, "image": 250, "text": 150}
    assert tags == [mix_schedule(ratios, 0, s) for s in range(1000)]  # deterministic
    assert tags != [mix_schedule(ratios, 1, s) for s in range(1000)]  # seeded
    assert tags[:100] != tags[100:200]  # each block shuffled
    with pytest.raises(ValueError):
        mix_schedule({"paired": 0.0}, 0, 0)


def test_mixed_loader(shards, tmp_path):
    paths, caps, d = shards
    img_only, _ = write_test_shards(str(tmp_path / "img"), num_shards=1, per_shard=8, text=False, grey=(), cmyk=())
    txt = tmp_path / "captions.txt"
    txt.write_text("\n".join(["a red circle", "a blue square on a teal background", "", "two green crosses"]))
    txt_shards, tcaps = write_test_shards(str(tmp_path / "txt"), num_shards=1, per_shard=6, image=False, grey=(),
                                          cmyk=())
    loaders = {
        "paired": build_loader(paths, 4, S, L, decoder="cpu", num_workers=0),
        "image": build_loader(img_only, 4, S, L, decoder="cpu", num_workers=0, modality="image"),
        "text": build_loader([str(txt)] + txt_shards, 4, S, L, modality="text"),
    }
    assert isinstance(loaders["text"], TextLoader) and loaders["text"].num_samples == 3 + 6
    ratios = {"paired": 0.5, "image": 0.3, "text": 0.2}
    mix = MixedLoader(loaders, ratios, seed=4, block=10)
    got = []
    it = iter(mix)
    for step in range(20):
        b = next(it)
        got.append(b["modality"])
        assert b["modality"] == mix_schedule(ratios, 4, step, 10)
        if b["modality"] in ("paired", "image"):
            assert b["image"].shape == (4, 3, S, S) and b["image"].dtype == torch.uint8
        if b["modality"] == "image":
            assert "text" not in b
        if b["modality"] == "text":
            assert "image" not in b and b["text"].shape == (4, L)
            assert all(c in ["a red circle", "a blue square on a teal background", "two green crosses"]
                       or c in tcaps.values() for c in b["caption"])
    assert {t: got.count(t) for t in ratios} == {"paired": 10, "image": 6, "text": 4}
    # resume of the mix: same next batch
    state = mix.state_dict()
    nxt = next(it)
    fresh = MixedLoader({"paired": build_loader(paths, 4, S, L, decoder="cpu", num_workers=0),
                         "image": build_loader(img_only, 4, S, L, decoder="cpu", num_workers=0, modality="image"),
                         "text": build_loader([str(txt)] + txt_shards, 4, S, L, modality="text")}, ratios, 4, 10)
    fresh.load_state_dict(state)
    again = next(iter(fresh))
    assert again["modality"] == nxt["modality"]
    assert torch.equal(again.get("image", again.get("text")), nxt.get("image", nxt.get("text")))


def test_model_consumes_batches(shards):
    from m3ae_engine import M3AE, M3AEConfig
    paths, _, _ = shards
    cfg = M3AEConfig.from_preset("tiny")
    b = next(iter(build_loader(paths, 4, cfg.image_size, cfg.text_length, decoder="cpu", num_workers=0)))
    model = M3AE(cfg)
    out = model(b["image"], b["text"], b["text_padding_mask"])
    assert torch.isfinite(out.loss)
    out = model(b["image"])
    assert torch.isfinite(out.loss)
    t = next(iter(build_loader(paths, 4, cfg.image_size, cfg.text_length, modality="text")))
    out = model(text=t["text"], text_padding_mask=t["text_padding_mask"])
    assert torch.isfinite(out.loss)


def test_gpu_transform_matches_pillow_on_cpu(shards):
    """The nvJPEG path's torch resampling (run here on CPU tensors) against Pillow, same boxes and flips."""
    from m3ae_engine.data.transforms import augment_gpu, augment_pil, decode_pil, sample_params
    from m3ae_engine.data.testdata import jpeg_bytes
    for i, size in enumerate([(160, 96), (96, 160), (200, 80), (64, 64)]):
        im = decode_pil(jpeg_bytes(i, size=size)[0])
        t = torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())
        for random_crop in (False, True):
            box, fl = sample_params(0, 0, i, im.height, im.width, random_crop=random_crop, flip=True)
            ref = torch.from_numpy(augment_pil(im, S, box, fl).copy()).float()
            got = augment_gpu([t], S, [box], [fl])[0].float()
            assert got.shape == ref.shape == (3, S, S)
            assert (got - ref).abs().mean() < 1.5, (size, random_crop)


def test_nvjpeg_batch_logic_on_cpu(shards, tmp_path, monkeypatch):
    """NvJpegLoader's batching, crop choice and corrupt-slot filling, with Pillow standing in for nvJPEG."""
    from m3ae_engine.data.pillow_nvjpeg import NvJpegLoader, _ShardLoaderBase
    from m3ae_engine.data.transforms import decode_pil
    paths, caps, _ = shards

    def fake_decode(self, data, keys, bad):
        out = []
        for d, k in zip(data, keys):
            try:
                out.append(torch.from_numpy(np.asarray(decode_pil(d)).transpose(2, 0, 1).copy()))
            except Exception as e:
                out.append(None)
                bad.append((k, str(e)))
        return out

    def make(src, **kw):
        loader = NvJpegLoader.__new__(NvJpegLoader)
        _ShardLoaderBase.__init__(loader, src, B, S, L, device="cpu", **kw)
        loader.num_threads, loader.prefetch = 2, 3
        return loader

    monkeypatch.setattr(NvJpegLoader, "_decode", fake_decode)
    kw = dict(epochs=2, seed=6)
    ref = list(build_loader(paths, B, S, L, decoder="cpu", num_workers=0, **kw))
    got = list(make(paths, **kw))
    assert len(got) == len(ref) == 2 * N // B
    for g, r in zip(got, ref):
        assert g["key"] == r["key"] and torch.equal(g["text"], r["text"]) and g["decoder"] == "nvjpeg"
        assert (g["image"].float() - r["image"].float()).abs().mean() < 1.5
    a = make(paths, **kw)
    it = iter(a)
    next(it), next(it)
    b = make(paths, **kw)
    b.load_state_dict(a.state_dict())
    assert next(iter(b))["key"] == got[2]["key"]
    # a corrupt image: skipped, counted, its slot filled from the batch
    bad = tmp_path / "bad.tar"
    plant(paths[0], bad, {"000000002.jpg": b"junk" * 50})
    loader = make(str(bad), epochs=1, shuffle=False, max_corrupt_fraction=1.0)
    with pytest.warns(RuntimeWarning, match="000000002"):
        out = next(iter(loader))
    assert out["image"].shape == (B, 3, S, S) and loader.corrupt_count == 1
    assert torch.equal(out["image"][2], out["image"][0])
    assert out["key"][2] == out["key"][0] and out["caption"][2] == out["caption"][0]
    assert torch.equal(out["text"][2], out["text"][0])


def test_jpeg_components():
    from m3ae_engine.data.testdata import jpeg_bytes
    from m3ae_engine.data.transforms import jpeg_components
    assert jpeg_components(jpeg_bytes(0, mode="RGB")[0]) == 3
    assert jpeg_components(jpeg_bytes(0, mode="L")[0]) == 1
    assert jpeg_components(jpeg_bytes(0, mode="CMYK")[0]) == 4
    from PIL import Image
    b = io.BytesIO()
    Image.new("RGB", (40, 30)).save(b, "JPEG", progressive=True)
    assert jpeg_components(b.getvalue()) == 3
    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, "PNG")
    assert jpeg_components(b.getvalue()) is None
    assert jpeg_components(b"\xff\xd8\xff" + b"\x00" * 20) is None


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_cpu_matches_pillow_without_crop(tmp_path):
    """Crop and flip off: DALI (libjpeg-turbo, resize not_smaller + centre crop) ~ Pillow (centre square, resize)."""
    paths, caps = write_test_shards(str(tmp_path), sizes=((160, 96), (96, 160), (128, 128), (200, 80), (80, 170)))
    kw = dict(epochs=1, seed=1, random_crop=False, flip=False)
    ref = {}
    for b in build_loader(paths, B, 64, L, decoder="cpu", num_workers=0, **kw):
        ref.update({c: b["image"][i].float() for i, c in enumerate(b["caption"])})
    diffs = []
    for b in build_loader(paths, B, 64, L, decoder="dali", device="cpu", num_threads=1, **kw):
        assert b["image"].shape == (B, 3, 64, 64)
        diffs += [(b["image"][i].float() - ref[c]).abs().mean().item() for i, c in enumerate(b["caption"])]
    assert len(diffs) == N and sum(diffs) / N < 2.0 and max(diffs) < 4.0, diffs
    img = next(iter(build_loader(paths, B, 64, L, decoder="dali", device="cpu", num_threads=1, modality="image",
                                 normalize=True, **kw)))
    assert "text" not in img and img["image"].dtype == torch.float32 and img["image"].shape == (B, 3, 64, 64)


def test_train_glue(shards, tmp_path):
    import argparse
    from m3ae_engine import M3AE, M3AEConfig
    from m3ae_engine.data import SyntheticBatches, add_data_args, build_from_args, model_inputs
    paths, _, d = shards
    cfg = M3AEConfig.from_preset("tiny")
    p = argparse.ArgumentParser()
    add_data_args(p)
    build = lambda argv: build_from_args(p.parse_args(argv), 4, cfg.image_size, cfg.text_length, device="cpu")
    assert isinstance(build([]), SyntheticBatches)
    one = build(["--data", os.path.join(d, "*.tar"), "--decoder", "cpu", "--data-workers", "0"])
    assert isinstance(one, PillowLoader)
    txt = tmp_path / "t.txt"
    txt.write_text("a red circle\na blue square\n")
    mix = build(["--data", paths[0], "--image-data", paths[1], "--text-data", str(txt), "--decoder", "cpu",
                 "--data-workers", "0", "--mix", "paired=0.5,image=0.25,text=0.25"])
    assert isinstance(mix, MixedLoader)
    with pytest.raises(ValueError, match="--mix"):
        build(["--data", paths[0], "--mix", "paired=1,text=1"])
    model = M3AE(cfg)
    seen = set()
    for _, b in zip(range(8), mix):
        seen.add(b["modality"])
        kw = model_inputs(b)
        assert ("image" in kw) == (b["modality"] != "text") and ("text" in kw) == (b["modality"] != "image")
        assert torch.isfinite(model(**kw).loss)
    assert seen == {"paired", "image", "text"}
