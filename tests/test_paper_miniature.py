"""benchmarks/paper_miniature.py: the probe labels are the generator's draws, and the smoke setting
runs the real trainer + probe end to end and writes a well-formed JSON / markdown / PNG."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_miniature as pm  # noqa: E402
from m3ae_engine.data.synthetic import COLOURS  # noqa: E402


def test_probe_labels_match_what_the_generator_drew():
    images, labels = pm.probe_set(60, 32, seed=3)
    assert images.shape == (60, 3, 32, 32) and images.dtype == torch.uint8
    for a, classes in pm.ATTRIBUTES.items():
        assert labels[a].shape == (60,) and 0 <= int(labels[a].min()) and int(labels[a].max()) < len(classes)
    colours = list(COLOURS.values())
    for img, colour, pos in zip(images, labels["colour"], labels["position"]):
        # every shape covers the centre of its grid cell, drawn in its colour over the noisy background
        r, c = divmod(int(pos), 3)
        y, x = int((r + 0.5) / 3 * 32), int((c + 0.5) / 3 * 32)
        assert tuple(img[:, y, x].tolist()) == colours[int(colour)]
    assert len(set(labels["shape"].tolist())) > 1 and len(set(labels["position"].tolist())) > 1


def test_pairing_question_is_pending_without_the_field(monkeypatch):
    monkeypatch.setattr(pm, "pairing_available", lambda: False)
    q = pm.questions(smoke=True)
    assert q["paired_fraction"]["pending"] and not q["text_mask_ratio"]["pending"]


def test_smoke_study_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("M3AE_CPU_THREADS", "1")  # restored after the test; main() sets it again
    threads = torch.get_num_threads()
    try:
        res = pm.main(["--smoke", "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "paper_miniature_smoke.json").read_text())
    assert data["setting"] == "smoke" and data["complete"] and not data["errors"]
    assert set(data["questions"]) == {"m3ae_vs_mae", "text_mask_ratio", "paired_fraction"}
    expected = {c for q in data["questions"].values() if not q["pending"] for _, c in q["points"]}
    assert {"mae", "m3ae"} <= expected and {r["condition"] for r in data["runs"]} == expected
    chance = {a: 1 / len(v) for a, v in pm.ATTRIBUTES.items()}
    for r in data["runs"]:
        for a in pm.ATTRIBUTES:
            assert 0.0 <= r[a] <= 1.0 and 0.0 <= r[f"{a}_train"] <= 1.0
        assert math.isfinite(r["final_train_loss"])
        assert any(r[a] > 1.5 * chance[a] for a in pm.ATTRIBUTES), r  # the probe learns something
        assert data["summary"][r["condition"]]["mean"]["n"] == 1
    by = {r["condition"]: r for r in data["runs"]}
    assert by["m3ae"]["final_train_loss"] > by["mae"]["final_train_loss"]  # M3AE adds the word CE term
    accs = {tuple(r[a] for a in pm.ATTRIBUTES) for r in data["runs"]}
    assert len(accs) > 1, "every condition gave the same accuracies"
    assert data["environment"]["torch_threads"] == 1 and data["load_before"] is not None
    md = (tmp_path / "paper_miniature_smoke.md").read_text()
    for title in ("1. M3AE vs MAE", "2. text mask ratio", "3. paired fraction", "Directions as measured"):
        assert title in md
    png = (tmp_path / "paper_miniature_smoke.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert res["summary"] == data["summary"]


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        pm.parse_args(["--seeds", "0"])
    assert e.value.code == 2 and "--seeds must be >= 1" in capsys.readouterr().err


def test_trainer_cpu_threads_from_the_environment(monkeypatch):
    from m3ae_engine.model.config import ConfigError
    from m3ae_engine.train.loop import cpu_threads
    monkeypatch.delenv("M3AE_CPU_THREADS", raising=False)
    assert cpu_threads() >= 1
    monkeypatch.setenv("M3AE_CPU_THREADS", "3")
    assert cpu_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("M3AE_CPU_THREADS", bad)
        with pytest.raises(ConfigError, match="M3AE_CPU_THREADS must be a positive integer"):
            cpu_threads()
