"""Unpaired images in M3AE training (--unpaired-image-data / --unpaired-image-ratio): the image-only term's
value and weight, its separate log, exact resume, and 2 ranks (gloo) == 1 rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.model.config import ConfigError
from m3ae_engine.data import SyntheticBatches
from m3ae_engine.data.testdata import write_test_shards
from m3ae_engine.train.config import TrainConfig, parse
from m3ae_engine.train.batches import UNPAIRED_IMAGE_SEED_OFFSET, MaskNoise
from m3ae_engine.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(batch_size=8, steps=3, warmup_steps=1, log_every=1, tensorboard=False, num_workers=0, device="cpu")
SYNTH = dict(unpaired_image_data="synthetic", unpaired_image_ratio=0.5)  # 4 image-only samples per step


def rows(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"loss"' in line]


def test_image_only_term_is_weighted_as_the_paired_image_loss(tmp_path):
    kw = dict(BASE, steps=1, image_loss_weight=2.0)
    train(TrainConfig(**kw, output_dir=str(tmp_path / "plain")))
    train(TrainConfig(**kw, **SYNTH, output_dir=str(tmp_path / "mixed")))
    (plain,), (mixed,) = rows(tmp_path / "plain"), rows(tmp_path / "mixed")
    # same init, paired batch and masks: the paired terms agree and the total adds 2.0 x the unpaired loss
    assert mixed["image_loss"] == pytest.approx(plain["image_loss"], rel=1e-6)
    assert mixed["text_loss"] == pytest.approx(plain["text_loss"], rel=1e-6)
    assert mixed["loss"] == pytest.approx(plain["loss"] + 2.0 * mixed["unpaired_image_loss"], rel=1e-6)
    assert "unpaired_image_loss" not in plain
    # the logged term is the MAE loss of the initial model on the unpaired stream's first 4 images and masks
    torch.manual_seed(0)
    model = M3AE(M3AEConfig.from_preset("tiny", image_loss_weight=2.0))
    images = SyntheticBatches(4, model.config.image_size, model.config.text_length,
                              seed=UNPAIRED_IMAGE_SEED_OFFSET).batch_at(0)["image"]
    noise = MaskNoise(UNPAIRED_IMAGE_SEED_OFFSET, model.config.num_patches, model.config.text_length, 4, "sample")
    with torch.no_grad():
        want = model(image=images, image_noise=noise(0, 0, 0, 1, 4)[0]).image_loss
    assert mixed["unpaired_image_loss"] == pytest.approx(float(want), rel=1e-5)


def test_resume_with_image_only_shards_is_exact(tmp_path):
    shards, _ = write_test_shards(str(tmp_path / "img"), num_shards=1, per_shard=10, text=False)
    kw = dict(BASE, steps=6, unpaired_image_data=shards[0], unpaired_image_ratio=0.5)  # 24 reads: 2+ epochs
    train(TrainConfig(**kw, ckpt_every=3, output_dir=str(tmp_path / "ref")))
    train(TrainConfig(**kw, resume=str(tmp_path / "ref" / "checkpoints" / "step_00000003"),
                      output_dir=str(tmp_path / "resumed")))
    ref = {r["step"]: r for r in rows(tmp_path / "ref")}
    got = rows(tmp_path / "resumed")
    assert [r["step"] for r in got] == [4, 5, 6]
    for r in got:
        assert (r["loss"], r["unpaired_image_loss"]) == (ref[r["step"]]["loss"], ref[r["step"]]["unpaired_image_loss"])
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_match_one(tmp_path):
    kw = dict(BASE, **SYNTH)
    train(TrainConfig(**kw, output_dir=str(tmp_path / "one")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--output-dir", str(tmp_path / "two"),
           *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        for k in ("loss", "image_loss", "text_loss", "unpaired_image_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_flags_and_config_errors(tmp_path):
    cfg = parse(["--unpaired-image-data", "synthetic", "--unpaired-image-ratio", "0.25"])
    assert (cfg.unpaired_image_data, cfg.unpaired_image_ratio, cfg.unpaired_image_batch_size) == ("synthetic", 0.25, 16)
    for kw, needle in [(dict(unpaired_image_data="synthetic"), "positive --unpaired-image-ratio"),
                       (dict(unpaired_image_ratio=0.5), "--unpaired-image-data"),
                       (dict(SYNTH, unpaired_image_ratio=0.3), "= 2.4 image-only samples"),
                       (dict(SYNTH, grad_accum=8), r"divisible by grad_accum \(8\)"),
                       (dict(SYNTH, modality="image"), "add the shards to --data")]:
        with pytest.raises(ConfigError, match=needle):
            TrainConfig(**dict(BASE, **kw))
    with pytest.raises(ConfigError, match="--unpaired-image-data: no file matches"):
        train(TrainConfig(**dict(BASE, unpaired_image_data=str(tmp_path / "none.tar"), unpaired_image_ratio=0.5)))
