"""Partial pairing (--paired-fraction / --random-drop-text): the official deterministic_drop_text /
random_drop_text rule, the dropped captions' rows, the official loss on a batch with dropped captions,
no packed tokens for a sample without text, and the training loop (1 rank == 2 ranks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.model.config import ConfigError
from m3ae_engine.data import SyntheticBatches, build_loader, dali_available
from m3ae_engine.data.testdata import write_test_shards
from m3ae_engine.data.text_drop import TextDrop
from m3ae_engine.model.tokenizer import PAD_ID
from m3ae_engine.train.config import TrainConfig, parse
from m3ae_engine.train.loop import train
from test_model import _official_forward  # the padded line-by-line port of the official forward + losses

ROOT = Path(__file__).resolve().parent.parent


def official_drop(raw_index, deterministic_drop_text):
    """m3ae_public data.py ImageTextDataset.drop_text, deterministic half, as written there."""
    return float(raw_index % 100) / 100. < deterministic_drop_text


@pytest.mark.parametrize("paired_fraction,official_d", [(1.0, 0.0), (0.9, 0.1), (0.7, 0.3), (0.3, 0.7),
                                                        (0.1, 0.9), (0.0, 1.0)])
def test_deterministic_rule_is_the_official_one(paired_fraction, official_d):
    drop = TextDrop(paired_fraction)
    got = [drop.drops(i, epoch=0) for i in range(300)]
    assert got == [official_drop(i, official_d) for i in range(300)]
    assert sum(got[:100]) == round(official_d * 100)  # 1 - 0.7 in floats would also drop index 30
    assert got == [drop.drops(i, epoch=5) for i in range(300)]  # the same samples every epoch


def test_random_drop_rate_and_determinism():
    drop = TextDrop(1.0, 0.3, seed=4)
    flags = drop.flags(range(4000), [0] * 4000)
    assert 0.27 < sum(flags) / 4000 < 0.33
    assert flags == TextDrop(1.0, 0.3, seed=4).flags(range(4000), [0] * 4000)  # keyed, not a global stream
    assert flags != drop.flags(range(4000), [1] * 4000)  # a fresh draw each visit (epoch)
    both = TextDrop(0.5, 0.3, seed=4)  # either rule drops
    assert both.flags(range(4000), [0] * 4000) == [i % 100 < 50 or f for i, f in enumerate(flags)]


def test_synthetic_rows_of_dropped_captions_are_all_padding():
    plain = SyntheticBatches(8, 32, 16, seed=1, size=10)
    part = SyntheticBatches(8, 32, 16, seed=1, size=10, paired_fraction=0.97)  # index % 100 < 3 loses it
    for step in (0, 1):  # step 1 wraps into epoch 1: indices 6..9, 0..3
        a, b = plain.batch_at(step), part.batch_at(step)
        idx = [p % 10 for p in range(step * 8, step * 8 + 8)]
        dropped = torch.tensor([i < 3 for i in idx])
        assert torch.equal(a["image"], b["image"])
        assert (b["text"][dropped] == PAD_ID).all() and (b["text_padding_mask"][dropped] == 1).all()
        assert torch.equal(a["text"][~dropped], b["text"][~dropped])
        assert torch.equal(a["text_padding_mask"][~dropped], b["text_padding_mask"][~dropped])
        assert [c == "" for c in b["caption"]] == dropped.tolist()


def test_two_ranks_drop_what_one_rank_drops():
    one = SyntheticBatches(8, 32, 16, seed=2, paired_fraction=0.6, random_drop_text=0.4)
    ranks = [SyntheticBatches(4, 32, 16, seed=2, rank=r, world_size=2, paired_fraction=0.6, random_drop_text=0.4)
             for r in range(2)]
    for step in range(3):
        whole = one.batch_at(step)["text_padding_mask"]
        split = torch.cat([r.batch_at(step)["text_padding_mask"] for r in ranks])
        assert torch.equal(whole, split)


@pytest.mark.parametrize("packed", [True, False])
def test_loss_on_dropped_captions_is_the_official_value(packed):
    torch.manual_seed(0)
    c = M3AEConfig.from_preset("tiny", packed=packed)
    m = M3AE(c)
    batch = SyntheticBatches(6, c.image_size, c.text_length, seed=3, paired_fraction=0.97).batch_at(0)
    image, text, pad = batch["image"], batch["text"], batch["text_padding_mask"]
    assert (pad[:3] == 1).all() and (pad[3:] == 0).any(dim=1).all()  # 3 dropped, 3 paired
    g = torch.Generator().manual_seed(1)
    ni, nt = torch.rand(6, c.num_patches, generator=g), torch.rand(6, c.text_length, generator=g)
    out = m(image, text, pad, image_noise=ni, text_noise=nt)
    il, tl, acc, _, _ = _official_forward(m, image, text, pad, ni, nt)
    torch.testing.assert_close(out.text_loss, tl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.image_loss, il, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, il + c.text_loss_weight * tl, rtol=1e-5, atol=1e-6)
    # the dropped samples count 0 in a mean over all 6: half the mean over the 3 paired ones alone
    # (the paired samples' per-sample losses do not depend on the others: attention stays within a sample)
    _, tl_paired, _, _, _ = _official_forward(m, image[3:], text[3:], pad[3:], ni[3:], nt[3:])
    torch.testing.assert_close(tl, tl_paired * 3 / 6, rtol=1e-5, atol=1e-6)


def test_a_sample_without_text_costs_no_packed_tokens():
    c = M3AEConfig.from_preset("tiny")
    batch = SyntheticBatches(4, c.image_size, c.text_length, seed=3, paired_fraction=0.98).batch_at(0)
    pad = batch["text_padding_mask"]  # samples 0, 1 dropped; 2, 3 paired
    plan = M3AE(c).make_plan(4, True, pad)
    enc = plan.enc.cu_seqlens.diff().tolist()
    dec = plan.dec.cu_seqlens.diff().tolist()
    assert enc[:2] == [1 + c.image_keep] * 2 and dec[:2] == [1 + c.num_patches] * 2
    assert all(e > 1 + c.image_keep for e in enc[2:]) and all(d > 1 + c.num_patches for d in dec[2:])
    assert plan.enc.rows == sum(enc) and plan.dec.rows == sum(dec)  # exact sizes: nothing for the dropped
    owners = plan.text_target_index // c.text_length  # sample of each text prediction row
    assert not ((owners == 0) | (owners == 1)).any() and len(owners) > 0


BASE = dict(batch_size=8, steps=4, warmup_steps=1, log_every=1, tensorboard=False)


def rows(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"loss"' in line]


def test_config_flags_and_errors():
    cfg = parse(["--paired-fraction", "0.3", "--random-drop-text", "0.1"])
    assert (cfg.paired_fraction, cfg.random_drop_text) == (0.3, 0.1)
    for kw, needle in [(dict(paired_fraction=1.5), "paired_fraction must be in"),
                       (dict(random_drop_text=-0.1), "random_drop_text must be in"),
                       (dict(paired_fraction=0.5, modality="image"), "not with --modality image")]:
        with pytest.raises(ConfigError, match=needle):
            TrainConfig(**dict(BASE, **kw))


def test_training_two_ranks_match_one_with_text_free_steps(tmp_path):
    # indices 0..27 lose their caption: steps 1-3 have no text at all; at step 4 (samples 24..31) the
    # first rank has none and the second has all of it (DDP must not wait for unused text gradients)
    kw = dict(BASE, paired_fraction=0.72, device="cpu")
    train(TrainConfig(**kw, output_dir=str(tmp_path / "one")))
    one = rows(tmp_path / "one")
    assert [r["text_loss"] for r in one[:3]] == [0.0, 0.0, 0.0] and one[3]["text_loss"] > 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--output-dir", str(tmp_path / "two"),
           *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    two = rows(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "image_loss", "text_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)


GPU = pytest.mark.gpu
NO_DALI = pytest.mark.skipif(not dali_available(), reason="DALI not installed")


@pytest.mark.parametrize("decoder,device", [("cpu", "cpu"), pytest.param("dali", "cpu", marks=NO_DALI),
                                            pytest.param("nvjpeg", "cuda", marks=GPU),
                                            pytest.param("dali", "cuda", marks=[GPU, NO_DALI])])
def test_shard_loaders_drop_by_table_index(tmp_path, decoder, device):
    from m3ae_engine.model.tokenizer import default_tokenizer
    paths, caps = write_test_shards(str(tmp_path), num_shards=2, per_shard=12)
    kw = dict(decoder=decoder, device=device, epochs=1, seed=5, paired_fraction=0.9, random_drop_text=0.25)
    kw.update({"cpu": dict(num_workers=0), "nvjpeg": dict(num_threads=1),
               "dali": dict(num_threads=1, shuffle_buffer=8)}[decoder])
    loader = build_loader(paths, 4, 32, 16, **kw)
    index_of = {f"{p}:{k}": i for i, (p, k) in enumerate((paths[int(k[:5])], k) for k in sorted(caps))}
    drop, tok = TextDrop(0.9, 0.25, seed=5), default_tokenizer(16)
    seen = 0
    for step, b in enumerate(loader):
        idx = [index_of[k] for k in b["key"]]
        epoch = 0 if decoder == "dali" else step * 4 // 24
        expect = torch.tensor(drop.flags(idx, [epoch] * len(idx)))
        assert (b["text_padding_mask"][expect] == 1).all() and (b["text"][expect] == PAD_ID).all()
        kept = [caps[k.split(":")[-1]] for k, e in zip(b["key"], expect) if not e]
        ref_text, ref_pad = tok.encode_batch(kept) if kept else (b["text"][:0], b["text_padding_mask"][:0])
        assert torch.equal(b["text"][~expect], ref_text) and torch.equal(b["text_padding_mask"][~expect], ref_pad)
        assert [c == "" for c in b["caption"]] == expect.tolist()
        seen += int(expect.sum())
    assert seen >= 10  # indices 0..9 always, plus random drops


def test_training_on_shards_drops_captions(tmp_path):
    paths, _ = write_test_shards(str(tmp_path / "shards"), num_shards=1, per_shard=16)
    train(TrainConfig(**dict(BASE, steps=2, num_workers=0, data=paths[0], paired_fraction=0.5,
                             output_dir=str(tmp_path / "run"))))
    got = rows(tmp_path / "run")  # 16 samples, indices 0..15 < 50: no caption survives
    assert len(got) == 2 and all(r["text_loss"] == 0.0 and r["image_loss"] > 0 for r in got)
