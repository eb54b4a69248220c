"""The plain-PyTorch training loop: exact resume, NaN skipping, atomic checkpoints, SIGTERM, export.

Tiny preset, batch 8, a few steps: each in-process run takes about a second on a CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3ae_engine.train.checkpoint import consolidated_state_dict, list_checkpoints, load_exported, main as ckpt_main
from m3ae_engine.train.config import TrainConfig
from m3ae_engine.train.loop import TrainingDiverged, train

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(batch_size=8, steps=6, warmup_steps=2, log_every=1, tensorboard=False)


def run(out, **kw):
    return train(TrainConfig(**dict(BASE, output_dir=str(out), **kw)))


def losses(out):
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 6-step run (checkpoint at step 3 on the way)."""
    out = tmp_path_factory.mktemp("ref")
    result = run(out, ckpt_every=3)
    return out, result


def test_loss_falls_and_export_loads(reference, tmp_path):
    out, result = reference
    assert result["step"] == 6 and result["skipped_steps"] == 0
    ref = load_file(str(out / "model.safetensors"))
    model = load_exported(out / "model.safetensors")  # config travels in the file's metadata
    assert weights_equal(ref, {k: v for k, v in model.state_dict().items()})
    ckpt_main(["export", str(out), str(tmp_path / "again.safetensors")])  # the CLI, on the newest checkpoint
    assert weights_equal(ref, load_file(str(tmp_path / "again.safetensors")))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003", "step_00000006"]


def test_resume_continues_exactly(reference, tmp_path):
    """3 steps, stop, resume, 3 steps == 6 steps: the same losses and the same final weights, bit for bit."""
    ref_out, _ = reference
    result = run(tmp_path, resume=str(ref_out / "checkpoints" / "step_00000003"))
    ref_losses, got = losses(ref_out), losses(tmp_path)
    assert sorted(got) == [4, 5, 6] and result["step"] == 6
    assert all(got[s] == ref_losses[s] for s in got), (got, ref_losses)
    assert weights_equal(load_file(str(ref_out / "model.safetensors")), load_file(str(tmp_path / "model.safetensors")))


def test_nan_steps_are_skipped_and_counted(reference, tmp_path, monkeypatch):
    monkeypatch.setenv("M3AE_INJECT_NAN_STEPS", "3")  # the 4th step (0-based index 3)
    result = run(tmp_path, ckpt_every=4)
    assert result["skipped_steps"] == 1 and result["step"] == 6
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert not torch.isfinite(torch.tensor(rows[3]["grad_norm"]))
    # the skipped step changed nothing: the weights after 4 steps are those after 3 of the clean run
    assert weights_equal(consolidated_state_dict(tmp_path / "checkpoints" / "step_00000004"),
                         consolidated_state_dict(reference[0] / "checkpoints" / "step_00000003"))


def test_many_nan_steps_stop_with_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("M3AE_INJECT_NAN_STEPS", "2,3,4,5")
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row"):
        run(tmp_path, ckpt_every=2, max_bad_steps=2)
    good, stopped = list_checkpoints(tmp_path / "checkpoints")
    assert (good.name, stopped.name) == ("step_00000002", "step_00000004")
    assert weights_equal(consolidated_state_dict(good), consolidated_state_dict(stopped))


def _launch(out, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "train.py"), "--batch-size", "8", "--warmup-steps", "2", "--log-every", "1",
           "--tensorboard", "false", "--output-dir", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_during_checkpoint_write_resumes_from_previous(reference, tmp_path):
    p = _launch(tmp_path, "--steps", "6", "--ckpt-every", "3", env={"M3AE_CRASH_IN_CHECKPOINT_STEP": "6"})
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 17, log  # died inside the write of step 6
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]
    assert (tmp_path / "checkpoints" / ".tmp-step_00000006").is_dir()  # the half-written one is ignored
    p = _launch(tmp_path, "--steps", "6", "--ckpt-every", "3", "--resume", "latest")
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "resumed_from=" in log and "step_00000003" in log, log
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000006").exists()
    assert weights_equal(load_file(str(reference[0] / "model.safetensors")),
                         load_file(str(tmp_path / "model.safetensors")))


def test_sigterm_saves_and_resume_matches(tmp_path):
    """Preemption: SIGTERM mid-run saves a checkpoint and exits 0; --resume latest finishes the run with the
    losses an uninterrupted run has."""
    steps = "30"
    p = _launch(tmp_path / "a", "--steps", steps)
    metrics = tmp_path / "a" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or not metrics.read_text()):
        time.sleep(0.02)  # signal right after the first logged step, long before step 30
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "stopped by signal" in log, log
    (stopped,) = list_checkpoints(tmp_path / "a" / "checkpoints")
    k = int(stopped.name.split("_")[1])
    assert 1 <= k < 30
    p = _launch(tmp_path / "a", "--steps", steps, "--resume", "latest")
    assert p.communicate(timeout=180)[0] and p.returncode == 0
    run(tmp_path / "b", steps=30)  # the uninterrupted run
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert all(a[s] == b[s] for s in b)
    assert weights_equal(load_file(str(tmp_path / "a" / "model.safetensors")),
                         load_file(str(tmp_path / "b" / "model.safetensors")))


def test_grad_accumulation_matches_full_batch(reference, tmp_path):
    """2 micro-batches of 4 accumulate to the gradient of one batch of 8 (same samples, same masks)."""
    run(tmp_path, grad_accum=2)
    a, b = losses(reference[0]), losses(tmp_path)
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)
    wa, wb = load_file(str(reference[0] / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_eval_results_are_logged_with_the_training_metrics(tmp_path):
    run(tmp_path, steps=4, eval_every=2, eval_batches=1)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] > 0 and "eval_image_loss" in r and "eval_text_loss" in r for r in evals)
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
