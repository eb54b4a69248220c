"""The default run's outputs: a folder by default, said at start and end, a progress bar with metrics and
the lr to be applied from the first step, model fields reaching the model, W&B offline."""
import json
import re
from pathlib import Path

import pytest
import torch

import train
from m3ae_engine import M3AE

SHORT = ["--steps", "3", "--batch-size", "4", "--no-tensorboard", "--image-size", "16", "--patch-size", "8",
         "--text-length", "16"]


def test_default_run_writes_into_runs_and_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.main(SHORT)
    out, err = capsys.readouterr()
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"tiny-\d{8}-\d{6}", run.name)
    for name in ("metrics.jsonl", "model.safetensors", "train_config.json", "config.json"):
        assert (run / name).is_file(), name
    text = out + err
    assert f"outputs go to runs/{run.name}/" in text and f"outputs saved in runs/{run.name}/" in text
    assert "model.safetensors" in text.split("outputs saved in")[1]
    # the model fields given as flags reached the model that was trained and saved
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["image_size"], cfg["patch_size"], cfg["text_length"]) == (16, 8, 16)
    assert M3AE.from_pretrained(run).config.num_patches == 4
    # metrics from the first step on, and the bar's lr is the next step's (step 0 of warm-up applies 0)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["lr"] == 0.0
    first_bar = next(line for line in err.replace("\r", "\n").splitlines() if "loss=" in line)
    assert "1/3" in first_bar and not re.search(r"lr=0\.0e\+00", first_bar), first_bar


def test_no_output_dir_says_nothing_is_saved(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.main(SHORT + ["--steps", "1", "--output-dir", "none"])
    assert "outputs: none" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_wandb_offline_logs_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    train.main(SHORT + ["--output-dir", str(tmp_path / "run"), "--wandb-project", "m3ae-test"])
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "run").rglob("*"))


def test_wandb_missing_is_a_one_line_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match="--wandb-project needs the wandb package"):
        train.main(SHORT + ["--output-dir", "none", "--wandb-project", "x"])


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    from m3ae_engine import M3AEConfig
    model = M3AE(M3AEConfig.from_preset("tiny", emb_dim=32, num_heads=2)).eval()
    out = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    for src in (tmp_path / "m", tmp_path / "m" / "model.safetensors"):
        loaded = M3AE.from_pretrained(src)
        assert loaded.config == model.config and not loaded.training
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(loaded.forward_representation(img), model.forward_representation(img))
    with pytest.raises(FileNotFoundError):
        M3AE.from_pretrained(tmp_path / "nothing")


def test_torch_hub_load_local(tmp_path):
    root = str(Path(__file__).resolve().parent.parent)
    fresh = torch.hub.load(root, "m3ae_tiny", source="local", emb_dim=32, num_heads=2)
    assert isinstance(fresh, M3AE) and fresh.config.emb_dim == 32
    fresh.save_pretrained(tmp_path / "w")
    loaded = torch.hub.load(root, "m3ae_tiny", source="local", weights=str(tmp_path / "w"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), loaded.state_dict().values()))
    import importlib.util
    from m3ae_engine.model.config import ENCODER_PRESETS
    spec = importlib.util.spec_from_file_location("hubconf", Path(root) / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert all(callable(getattr(hub, f"m3ae_{p}")) for p in ENCODER_PRESETS)  # an entry per preset
    assert hub.m3ae_small(depth=1, dec_depth=1, vocab_size=64).config.emb_dim == 384
    with pytest.raises(ValueError, match="no M3AE weights are hosted"):
        torch.hub.load(root, "m3ae_base", source="local", weights=True)
