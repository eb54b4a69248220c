"""2 ranks (gloo, CPU) == 1 rank at the same global batch: torch DDP, DeepSpeed ZeRO-1/2/3.

Every run injects a NaN at the same step, so the comparison also checks that all runtimes skip it
alike. DeepSpeed runs on the CPU with DS_ACCELERATOR=cpu and the gloo backend (half precision switched
off by prepare_ds_config); its first use compiles DeepSpeed's shared-memory comm op (~1 min, cached).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3ae_engine.train.config import TrainConfig
from m3ae_engine.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
ARGS = dict(batch_size=8, steps=4, warmup_steps=1, log_every=1, tensorboard=False)
NAN_STEP = "2"


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))}


def train_one_rank(**kw):
    """One in-process rank with the same poisoned step as the torchrun ranks (M3AE_INJECT_NAN_STEPS)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M3AE_INJECT_NAN_STEPS", NAN_STEP)
        return train(TrainConfig(**ARGS, **kw))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    result = train_one_rank(output_dir=str(out))
    assert result["skipped_steps"] == 1
    return out


def torchrun_2(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--output-dir", str(out), "--device", "cpu",
           *[f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()], *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               M3AE_INJECT_NAN_STEPS=NAN_STEP)
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-5000:]
    return p.stdout


def assert_matches(one, two):
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a, b)
    rows = [json.loads(line) for line in open(Path(two) / "metrics.jsonl")]
    assert rows[-1]["skipped_steps"] == 1
    wa, wb = load_file(str(Path(one) / "model.safetensors")), load_file(str(Path(two) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_two_ranks_match_one(one_rank, tmp_path):
    torchrun_2(tmp_path)
    assert_matches(one_rank, tmp_path)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_ranks_match_one(stage, one_rank, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install m3ae-engine[deepspeed])")
    ds = f"--deepspeed_config={ROOT / 'configs' / f'zero{stage}.json'}"
    log = torchrun_2(tmp_path / "run", ds, "--ckpt-every=2")
    assert_matches(one_rank, tmp_path / "run")  # model.safetensors: exported from the ZeRO checkpoint
    held = {int(r): (int(n), int(t)) for r, n, t in re.findall(r"rank (\d): holds (\d+) of (\d+) parameters", log)}
    assert sorted(held) == [0, 1], log[-3000:]
    total = held[0][1]
    for n, _ in held.values():
        if stage == 3:  # each rank stores about half of the weights
            assert abs(n - total / 2) < 0.01 * total, held
        else:
            assert n == total
    if stage == 3:  # resume the sharded checkpoint of step 2 on 2 ranks: the same last 2 steps
        torchrun_2(tmp_path / "resumed", ds, f"--resume={tmp_path / 'run' / 'checkpoints' / 'step_00000002'}")
        a, b = losses(tmp_path / "run"), losses(tmp_path / "resumed")
        assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in b), (a, b)
        wa = load_file(str(tmp_path / "run" / "model.safetensors"))
        wb = load_file(str(tmp_path / "resumed" / "model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_zero2_with_gradient_accumulation_matches_one_rank(one_rank, tmp_path):
    """2 ranks x 2 micro-steps: DeepSpeed must step once per optimizer step with the averaged gradient
    (the loop marks the accumulation boundary; DeepSpeed's own count assumes a step() per micro-batch)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install m3ae-engine[deepspeed])")
    ds = f"--deepspeed_config={ROOT / 'configs' / 'zero2.json'}"
    torchrun_2(tmp_path, ds, "--grad-accum=2")
    assert_matches(one_rank, tmp_path)


def test_ddp_mae_mode_two_ranks_match_one(tmp_path):
    """Image-only (MAE) training under DDP: the unused text parameters are frozen, so DDP's reducer
    does not wait for them (it raised at the second step before)."""
    train_one_rank(output_dir=str(tmp_path / "one"), modality="image")
    torchrun_2(tmp_path / "two", "--modality=image")
    assert_matches(tmp_path / "one", tmp_path / "two")
