"""GPU loaders (pytest -m gpu): nvJPEG path and DALI `mixed` give the CPU path's shapes and close pixels."""
import os

import pytest
import torch

from m3ae_engine.data import build_loader, dali_available, nvjpeg_available
from m3ae_engine.data.testdata import write_test_shards
from shard_helpers import plant

pytestmark = pytest.mark.gpu
B, S, L = 8, 64, 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("wdsgpu")
    paths, caps = write_test_shards(str(d), num_shards=2, per_shard=12, grey=(3,), cmyk=(5,),
                                    sizes=((160, 96), (96, 160), (128, 128), (200, 80), (80, 170)))
    return paths, caps


def _by_key(loader):
    out = {}
    for b in loader:
        for i, k in enumerate(b["key"]):
            out[k] = (b["image"][i].float().cpu(), b["text"][i])
    return out


def _compare(gpu, cpu, mean_tol, max_mean_per_image):
    assert gpu.keys() == cpu.keys()
    diffs = []
    for k in cpu:
        g, c = gpu[k][0], cpu[k][0]
        assert g.shape == c.shape == (3, S, S)
        assert torch.equal(gpu[k][1], cpu[k][1])
        diffs.append((g - c).abs().mean().item())
    assert sum(diffs) / len(diffs) < mean_tol, diffs
    assert max(diffs) < max_mean_per_image, diffs


@pytest.mark.skipif(not nvjpeg_available(), reason="needs CUDA + torchvision")
@pytest.mark.parametrize("random_crop", [False, True])
def test_nvjpeg_matches_cpu(shards, random_crop):
    paths, _ = shards
    kw = dict(epochs=1, seed=1, random_crop=random_crop, flip=random_crop)
    gpu_loader = build_loader(paths, B, S, L, decoder="nvjpeg", device="cuda", **kw)
    assert gpu_loader.decoder == "nvjpeg"
    b = next(iter(build_loader(paths, B, S, L, decoder="nvjpeg", device="cuda", **kw)))
    assert b["image"].device.type == "cuda" and b["image"].dtype == torch.uint8 and b["image"].shape == (B, 3, S, S)
    assert b["text"].device.type == "cpu" and b["text_padding_mask"].device.type == "cpu"
    gpu = _by_key(gpu_loader)
    cpu = _by_key(build_loader(paths, B, S, L, decoder="cpu", device="cpu", num_workers=0, **kw))
    # the same crop boxes and flips on both paths: only the JPEG decoders and resamplers differ
    _compare(gpu, cpu, mean_tol=2.0, max_mean_per_image=5.0)
    assert gpu_loader.corrupt_count == 0  # the CMYK JPEG went through the Pillow fallback, not skipped
    n = next(iter(build_loader(paths, B, S, L, decoder="nvjpeg", device="cuda", normalize=True, **kw)))
    assert n["image"].dtype == torch.float32 and n["image"].is_cuda


@pytest.mark.skipif(not nvjpeg_available(), reason="needs CUDA + torchvision")
def test_nvjpeg_resume_and_corrupt(shards, tmp_path):
    paths, _ = shards
    kw = dict(decoder="nvjpeg", device="cuda", epochs=2, seed=4)
    full = list(build_loader(paths, 5, S, L, **kw))
    a = build_loader(paths, 5, S, L, **kw)
    it = iter(a)
    for _ in range(3):
        next(it)
    b = build_loader(paths, 5, S, L, **kw)
    b.load_state_dict(a.state_dict())
    rest = list(b)
    assert len(rest) == len(full) - 3
    for x, y in zip(rest, full[3:]):
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"])
    bad = tmp_path / "bad.tar"
    plant(paths[0], bad, {"000000002.jpg": b"\xff\xd8\xff" + os.urandom(400)})
    loader = build_loader(str(bad), 12, S, L, decoder="nvjpeg", device="cuda", epochs=1, max_corrupt_fraction=1.0)
    with pytest.warns(RuntimeWarning, match="000000002"):
        out = list(loader)
    assert out[0]["image"].shape == (12, 3, S, S) and loader.corrupt_count == 1


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_mixed_matches_cpu(shards):
    paths, caps = shards
    kw = dict(epochs=1, seed=1, random_crop=False, flip=False)
    loader = build_loader(paths, B, S, L, decoder="dali", device="cuda", num_threads=2, **kw)
    batches = list(loader)
    assert loader.decoder == "dali" and len(batches) == 24 // B
    cpu = {}
    for b in build_loader(paths, B, S, L, decoder="cpu", device="cpu", num_workers=0, **kw):
        for i, c in enumerate(b["caption"]):
            cpu[c] = b["image"][i].float()
    diffs = []
    for b in batches:
        assert b["image"].is_cuda and b["image"].dtype == torch.uint8 and b["image"].shape == (B, 3, S, S)
        assert b["text"].device.type == "cpu"
        for i, c in enumerate(b["caption"]):
            diffs.append((b["image"][i].float().cpu() - cpu[c]).abs().mean().item())
    assert sorted(c for b in batches for c in b["caption"]) == sorted(caps.values())
    assert sum(diffs) / len(diffs) < 4.0 and max(diffs) < 10.0, diffs
