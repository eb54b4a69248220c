"""Linear probe and OOD score, end to end on a small generated ImageFolder with a tiny model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.interop.exported import save_checkpoint
from m3ae_engine.eval import linear_probe, ood
from m3ae_engine.eval.features import ImageFolder, load_image
from m3ae_engine.eval.linear_probe import LARS, lr_at, topk_accuracy
from m3ae_engine.eval.ood import auroc, fit_mahalanobis, mahalanobis_score

COLOURS = {"red": (200, 40, 40), "blue": (40, 60, 210), "green": (40, 200, 60)}


def _write_images(folder, colour, n, rng, size=(40, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = np.array(colour, dtype=np.int16)
        arr = np.clip(base + rng.integers(-30, 31, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in ("red", "blue"):
            _write_images(root / split / c, COLOURS[c], n, rng)
    _write_images(root / "ood", COLOURS["green"], 6, rng)  # flat folder
    torch.manual_seed(0)
    cfg = M3AEConfig.from_preset("tiny")
    save_checkpoint(M3AE(cfg).state_dict(), cfg, root / "ckpt")
    return root


def test_image_folder_reads_resizes_and_checks(setup):
    ds = ImageFolder(setup / "train", 32)
    assert ds.classes == ["blue", "red"] and len(ds) == 16
    img, y = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and y == 0
    with pytest.raises(FileNotFoundError):
        ImageFolder(setup / "nope", 32)
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(setup / "ood", 32)
    assert len(ImageFolder(setup / "ood", 32, allow_flat=True)) == 6
    with pytest.raises(ValueError, match="not among the training classes"):
        ImageFolder(setup / "train", 32, classes=["red"])
    bad = setup / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(bad, 32)


def test_linear_probe_end_to_end_with_cache(setup, capsys):
    out = setup / "probe"
    base = ["--checkpoint", str(setup / "ckpt"), "--train", str(setup / "train"), "--val", str(setup / "val"),
            "--output-dir", str(out), "--device", "cpu", "--batch-size", "8"]
    argv = base + ["--epochs", "30", "--optimizer", "sgd", "--blr", "30", "--warmup-epochs", "2"]
    assert linear_probe.main(argv) == 0
    res = json.loads((out / "linear_probe.json").read_text())
    assert res["num_classes"] == 2 and res["num_train"] == 16 and res["num_val"] == 8
    assert res["top5"] == 100.0  # 2 classes: top-5 covers both
    assert res["top1"] >= 75.0, res  # colour classes are separable even for a random encoder
    assert (out / "features_train.pt").is_file() and (out / "features_val.pt").is_file()
    printed = capsys.readouterr().out
    assert "top-1" in printed
    # second run reuses the cache; LARS (the default recipe) runs too
    assert linear_probe.main(base + ["--epochs", "3"]) == 0
    assert "reusing cached features" in capsys.readouterr().err
    # stale cache (images changed) is recomputed
    _write_images(setup / "val" / "red", COLOURS["red"], 5, np.random.default_rng(9))
    assert linear_probe.main(argv) == 0
    assert "stale" in capsys.readouterr().err
    assert json.loads((out / "linear_probe.json").read_text())["num_val"] == 9
    # bad input: a missing folder is a clear error
    assert linear_probe.main(["--checkpoint", str(setup / "ckpt"), "--train", str(setup / "missing"),
                              "--val", str(setup / "val"), "--output-dir", str(out)]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_ood_end_to_end(setup, capsys):
    out = setup / "ood_out"
    assert ood.main(["--checkpoint", str(setup / "ckpt"), "--train", str(setup / "train"), "--in",
                     str(setup / "val"), "--ood", str(setup / "ood"), "--output-dir", str(out)]) == 0
    res = json.loads((out / "ood.json").read_text())
    a = res["ood"][str(setup / "ood")]["auroc"]
    assert 0.0 <= a <= 1.0 and res["ood"][str(setup / "ood")]["num"] == 6
    assert a > 0.9, res  # green images are far from the red/blue class means
    assert "AUROC" in capsys.readouterr().out


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(1)
    neg = rng.integers(0, 6, 37).astype(float)
    pos = rng.integers(2, 9, 23).astype(float)
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(neg, pos) == pytest.approx(pairs, abs=1e-12)
    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([2, 3], [0, 1]) == 0.0 and auroc([1, 1], [1]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_mahalanobis_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    y = torch.arange(40) % 3
    x[y == 1] += 4
    means, prec = fit_mahalanobis(x, y, ridge=0.0)
    xd = x.double()
    mu = torch.stack([xd[y == c].mean(0) for c in range(3)])
    cov = sum(((xd[y == c] - mu[c]).T @ (xd[y == c] - mu[c])) for c in range(3)) / 40
    q = torch.randn(7, 5, generator=g).double()
    want = torch.stack([torch.stack([(v - mu[c]) @ torch.linalg.solve(cov, v - mu[c]) for c in range(3)]).min()
                        for v in q])
    torch.testing.assert_close(mahalanobis_score(q, means, prec), want, rtol=1e-8, atol=1e-8)


def test_lars_step_and_schedule():
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([p, b], lr=0.5, weight_decay=0.1, momentum=0.9)
    p.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt.step()
    dp = torch.tensor([[0.3, 1.4]])  # grad + wd * p
    want = torch.tensor([[3.0, 4.0]]) - 0.5 * dp * (0.001 * 5.0 / dp.norm())
    torch.testing.assert_close(p.data, want)
    torch.testing.assert_close(b.data, torch.tensor([0.0]))  # 1-D: plain momentum SGD, no decay
    assert lr_at(0, 1.0, 10, 100) == 0.0 and lr_at(5, 1.0, 10, 100) == 0.5
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0) and lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    acc = topk_accuracy(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]]), torch.tensor([1, 2]))
    assert acc == {"top1": 50.0, "top5": 100.0}
