"""Unpaired data in the training loop: the official unpaired text term and MAE (image-only) mode,
on synthetic data and on real shards (paired shards, image-only shards, text shards)."""
import json
from pathlib import Path

import pytest

from m3ae_engine.model.config import ConfigError
from m3ae_engine.data.testdata import write_test_shards
from m3ae_engine.train.config import TrainConfig
from m3ae_engine.train.loop import train

BASE = dict(batch_size=8, steps=3, warmup_steps=1, log_every=1, tensorboard=False, num_workers=0)


def metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"loss"' in line]


def test_unpaired_text_term_adds_weighted_text_loss(tmp_path):
    train(TrainConfig(**dict(BASE, output_dir=str(tmp_path / "plain"))))
    train(TrainConfig(**dict(BASE, output_dir=str(tmp_path / "unpaired"), unpaired_text_data="synthetic",
                             unpaired_text_loss_weight=0.5)))
    plain, unpaired = metrics(tmp_path / "plain"), metrics(tmp_path / "unpaired")
    first_p, first_u = plain[0], unpaired[0]
    assert first_p["step"] == first_u["step"] == 1
    # same init, same paired batch and masks at step 1: the totals differ by exactly w * unpaired loss
    assert first_u["image_loss"] == pytest.approx(first_p["image_loss"], rel=1e-5)
    assert first_u["text_loss"] == pytest.approx(first_p["text_loss"], rel=1e-5)
    assert first_u["unpaired_text_loss"] > 1.0
    assert first_u["loss"] == pytest.approx(first_p["loss"] + 0.5 * first_u["unpaired_text_loss"], rel=1e-5)
    assert "unpaired_text_loss" not in first_p


def test_mae_mode_trains_image_only(tmp_path):
    result = train(TrainConfig(**dict(BASE, steps=4, output_dir=str(tmp_path), modality="image")))
    rows = metrics(tmp_path)
    assert all(r["text_loss"] == 0.0 and r["loss"] == pytest.approx(r["image_loss"]) for r in rows)
    assert result["last"] is not None


def test_shards_image_only_shards_and_text_shards(tmp_path):
    paired, _ = write_test_shards(str(tmp_path / "paired"), num_shards=1, per_shard=16)
    images, _ = write_test_shards(str(tmp_path / "images"), num_shards=1, per_shard=16, text=False)
    texts, _ = write_test_shards(str(tmp_path / "texts"), num_shards=1, per_shard=16, image=False)
    out = tmp_path / "run"
    train(TrainConfig(**dict(BASE, output_dir=str(out), data=paired[0], unpaired_text_data=texts[0],
                             unpaired_text_loss_weight=0.1)))
    rows = metrics(out)
    assert rows and all(r["unpaired_text_loss"] > 0 and r["image_loss"] > 0 for r in rows)
    out2 = tmp_path / "mae"
    train(TrainConfig(**dict(BASE, output_dir=str(out2), data=images[0], modality="image")))
    assert all(r["text_loss"] == 0.0 for r in metrics(out2))


@pytest.mark.parametrize("kw,needle", [
    (dict(unpaired_text_data="synthetic"), "positive --unpaired-text-loss-weight"),
    (dict(unpaired_text_loss_weight=0.5), "--unpaired-text-data"),
    (dict(modality="text"), "modality must be paired"),
])
def test_unpaired_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        TrainConfig(**dict(BASE, **kw))


def test_missing_unpaired_text_path(tmp_path):
    with pytest.raises(ConfigError, match="no file matches"):
        train(TrainConfig(**dict(BASE, unpaired_text_data=str(tmp_path / "nope.txt"), unpaired_text_loss_weight=0.1)))
