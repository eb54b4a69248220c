"""Faults (issue 19): planted pickles never run, one run per output folder, corrupt and truncated images,
a full disk during a checkpoint, a broken newest checkpoint, a second signal during the final save,
--max-bad-steps, shard hygiene. Tiny preset, a few steps; the helpers are test_train_loop's."""
import errno
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from m3ae_engine.train.checkpoint import CheckpointError, list_checkpoints, main as ckpt_main
from m3ae_engine.model.config import ConfigError
from m3ae_engine.data import build_loader, dali_available
from m3ae_engine.data.shards import main as shards_main
from m3ae_engine.data.sources import DataError, expand_sources
from m3ae_engine.data.testdata import write_test_shards
from m3ae_engine.data.transforms import jpeg_complete
from m3ae_engine.train.output_lock import OutputDirInUse
from m3ae_engine.train.loop import TrainingDiverged
from shard_helpers import members, plant
from test_train_loop import _launch, losses, run


class Payload:
    """Unpickling it would create the folder `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_pickle(path, marker, wrap=lambda p: {"model": p}):
    torch.save(wrap(Payload(marker)), path)


def one_line(e) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in msg.strip(), msg
    return msg


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts")
    run(out, steps=2, ckpt_every=1)
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- 1
def test_planted_pickles_never_run(two_checkpoints, tmp_path):
    marker = tmp_path / "PWNED"
    out = _copy(two_checkpoints, tmp_path / "run")
    step1, step2 = list_checkpoints(out / "checkpoints")
    plant_pickle(step2 / "state.pt", marker)
    with pytest.raises(CheckpointError, match="refused") as e:  # --resume PATH: no fallback
        run(out, steps=3, resume=str(step2))
    assert "state.pt" in one_line(e)
    with pytest.raises(SystemExit, match="error: .*refused"):  # the export CLI
        ckpt_main(["export", str(step2), str(tmp_path / "x.safetensors")])
    rng_only = _copy(step1, tmp_path / "rng_only")
    plant_pickle(rng_only / "rng_rank0.pt", marker, wrap=lambda p: {"python": p})
    with pytest.raises(CheckpointError, match="rng_rank0.pt: refused"):
        run(tmp_path / "other", steps=3, resume=str(rng_only))
    # convert / eval loaders (official pickles and .pt files)
    from m3ae_engine.interop.load import read_checkpoint
    from m3ae_engine.interop.report import ConversionError
    plant_pickle(tmp_path / "evil.pt", marker)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"params": Payload(marker)}, f)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(ConversionError):
            read_checkpoint(tmp_path / name)
    # --resume latest: the refused newest is skipped (named), the older one resumes
    result = run(out, steps=3, resume="latest")
    assert result["step"] == 3
    assert not marker.exists()


def test_deepspeed_files_load_weights_only(tmp_path):
    pytest.importorskip("deepspeed")
    from m3ae_engine.train.checkpoint import consolidated_state_dict, deepspeed_loads_weights_only
    marker = tmp_path / "PWNED"
    ck = tmp_path / "step_00000002"
    (ck / "deepspeed").mkdir(parents=True)
    (ck / "meta.json").write_text("{}")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        plant_pickle(ck / "deepspeed" / name, marker, wrap=lambda p: {"module": p, "optimizer_state_dict": p})
    with deepspeed_loads_weights_only():  # what DeepSpeed's load_checkpoint / zero_to_fp32 call
        with pytest.raises(CheckpointError, match="refused"):
            torch.load(ck / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refused .*posix.mkdir") as e:
        consolidated_state_dict(ck)  # the export path through DeepSpeed's zero_to_fp32
    one_line(e)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- 2
def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write into the output folder .*file/run") as e:
        run(tmp_path / "file" / "run", steps=1)  # below a regular file: NotADirectoryError from mkdir
    one_line(e)


def test_one_run_per_output_dir(two_checkpoints, tmp_path, capsys):
    out = _copy(two_checkpoints, tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        before = _snapshot(out)
        with pytest.raises(OutputDirInUse, match=f"is in use by PID {sleeper.pid}") as e:
            run(out, steps=4, resume="latest", ckpt_every=1)
        one_line(e)
        assert _snapshot(out) == before  # no metrics, config, checkpoint or temp-folder change
        p = _launch(out, "--steps", "4", "--resume", "latest")
        log = p.communicate(timeout=180)[0]
        assert p.returncode == 1 and f"is in use by PID {sleeper.pid}" in log and "Traceback" not in log, log
        assert _snapshot(out) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner is gone: the stale lock is taken over (with a note) and released at the end
    capsys.readouterr()
    assert run(out, steps=3, resume="latest")["step"] == 3
    assert "took over the stale lock" in capsys.readouterr().out
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------- 3
def test_jpeg_complete_is_the_marker_rule():
    """The head-and-tail scan equals its definition: an EOI after the last SOS, and some SOS."""
    rng = np.random.default_rng(0)
    parts = [b"\xff\xd9", b"\xff\xda", b"\xff", b"\xd9", b"\xda", b"a"]
    for _ in range(3000):
        data = b"\xff\xd8\xff\xe0" + b"".join(parts[i] for i in rng.integers(0, len(parts), rng.integers(0, 10)))
        assert jpeg_complete(data) == (data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0), data


def test_truncated_and_corrupt_jpegs(tmp_path):
    paths, _ = write_test_shards(str(tmp_path), num_shards=1, per_shard=8, grey=(), cmyk=())
    jpg = members(paths[0])["000000002.jpg"]
    assert jpeg_complete(jpg) and not jpeg_complete(jpg[:-30]) and not jpeg_complete(jpg[:-2])
    trunc = tmp_path / "trunc.tar"
    plant(paths[0], trunc, {"000000002.jpg": jpg[:-30]})  # libjpeg-turbo half-decodes this silently
    loaders = [dict(decoder="cpu", num_workers=0)] + ([dict(decoder="dali", num_threads=1)] if dali_available()
                                                       else [])
    for kw in loaders:
        loader = build_loader(str(trunc), 8, 32, 16, device="cpu", epochs=1, shuffle=False, seed=0,
                              max_corrupt_fraction=1.0, **kw) if kw["decoder"] == "cpu" else \
            build_loader(str(trunc), 8, 32, 16, device="cpu", epochs=1, shuffle=False, seed=0, **kw)
        with pytest.warns(RuntimeWarning, match="000000002"):
            (batch,) = list(loader)
        assert loader.corrupt_count == 1 and loader.corrupt_samples[0].endswith(":000000002"), kw
        assert batch["image"].shape == (8, 3, 32, 32) and not any(k.endswith(":000000002") for k in batch["key"])
    r = subprocess.run([sys.executable, "-m", "m3ae_engine.data.shards", "validate", str(trunc)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "000000002\ttruncated" in r.stdout
    if dali_available():  # DALI cannot skip an undecodable JPEG: one line naming the shard, with the fix
        bad = tmp_path / "bad.tar"
        plant(paths[0], bad, {"000000002.jpg": b"\xff\xd8\xff" + os.urandom(500)})
        loader = build_loader(str(bad), 8, 32, 16, decoder="dali", device="cpu", num_threads=1, epochs=1)
        with pytest.raises(DataError, match="validate .*--fix") as e:
            list(loader)
        assert str(bad) in one_line(e)


# ---------------------------------------------------------------------------------------------- 4
def test_disk_full_during_a_checkpoint(tmp_path, monkeypatch):
    import m3ae_engine.train.checkpoint as ck
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if ".tmp-step_00000004" in str(f):
            Path(f).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"step_00000004 \(disk full.*newest intact checkpoint is .*"
                                              r"step_00000002") as e:
        run(tmp_path, steps=4, ckpt_every=2)
    one_line(e)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
    assert not (tmp_path / ".lock").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.load_weights_only(tmp_path / "checkpoints" / "step_00000002" / "state.pt")["client_state"]["step"] == 2


def test_stale_temp_removed_and_resume_latest_falls_back(tmp_path, capsys):
    run(tmp_path, steps=4, ckpt_every=2, tensorboard=True)
    newest = tmp_path / "checkpoints" / "step_00000004" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated newest
    (tmp_path / "checkpoints" / ".tmp-step_00000006").mkdir()  # left by a killed write
    capsys.readouterr()
    result = run(tmp_path, steps=5, resume="latest", tensorboard=True)
    log = capsys.readouterr().out
    assert result["step"] == 5 and "resumed_from=" in log and "step_00000002" in log.split("resumed_from=")[1]
    assert "skipping the checkpoint" in log and "step_00000004" in log and "truncated or corrupt" in log
    assert "removed the unfinished .tmp-step_00000006" in log
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000006").exists()
    # metrics.jsonl: steps 3-4 of the first run were dropped at the resume, each step is there once
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]
    # TensorBoard likewise: the resumed run purges the cut-off run's events after step 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------- 5
def test_second_signal_during_the_signal_checkpoint(tmp_path):
    p = _launch(tmp_path, "--steps", "40", env={"M3AE_SIGNAL_IN_CHECKPOINT": str(int(signal.SIGINT))})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or not metrics.read_text()):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)  # the save it triggers receives a SIGINT in the middle
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "received again" in log and "stopped by signal" in log, log
    (ck,) = list_checkpoints(tmp_path / "checkpoints")
    assert (ck / "state.pt").is_file() and not list((tmp_path / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- 6
def test_max_bad_steps_acts_at_once_with_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("M3AE_INJECT_NAN_STEPS", ",".join(str(i) for i in range(1, 12)))
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row at step 4"):
        run(tmp_path / "a", steps=12, log_every=100, max_bad_steps=3)  # no log step before the stop
    assert [c.name for c in list_checkpoints(tmp_path / "a" / "checkpoints")] == ["step_00000004"]
    p = _launch(tmp_path / "b", "--steps", "12", "--log-every", "100", "--max-bad-steps", "3",
                env={"M3AE_INJECT_NAN_STEPS": "1,2,3,4,5,6,7,8,9,10,11"})
    log = p.communicate(timeout=180)[0]
    assert p.returncode == 3 and "Traceback" not in log, log
    assert [ln for ln in log.splitlines() if ln.startswith("error: 3 non-finite steps in a row at step 4")], log


class _LaggedWatch:
    """BadRunWatch as it behaves on CUDA (each step sees the previous step's count), on the CPU."""

    def __init__(self, device):
        self.prev = 0

    def update(self, run_max):
        seen, self.prev = self.prev, int(run_max)
        return seen


def test_max_bad_steps_reached_on_the_last_step_stops_with_the_lagged_watch_too(tmp_path, monkeypatch):
    import m3ae_engine.train.loop as trainer
    monkeypatch.setattr(trainer, "BadRunWatch", _LaggedWatch)
    monkeypatch.setenv("M3AE_INJECT_NAN_STEPS", "3,4,5")  # steps 4, 5, 6 of 6 are skipped
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row at step 6"):
        run(tmp_path / "a", steps=6, log_every=100, max_bad_steps=3)


# ---------------------------------------------------------------------------------------------- 7
def _add_members(src, dst, extra):
    with tarfile.open(src) as s, tarfile.open(dst, "w") as d:
        for m in s:
            d.addfile(m, s.extractfile(m))
        for name, data in extra.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            d.addfile(ti, io.BytesIO(data))


def test_shard_hygiene(tmp_path, capsys):
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    assert shards_main(["validate", str(empty)]) == 1
    assert "\t-\tempty\t" in capsys.readouterr().out
    paths, _ = write_test_shards(str(tmp_path / "src"), num_shards=1, per_shard=4, grey=(), cmyk=())
    evil = tmp_path / "evil.tar"
    jpg = members(paths[0])["000000001.jpg"]
    _add_members(paths[0], evil, {"../escape.jpg": jpg, "../escape.txt": b"a caption", "/abs/x.jpg": jpg})
    assert shards_main(["validate", str(evil), "--fix", str(tmp_path / "fixed")]) == 1
    out = capsys.readouterr().out
    assert "../escape.jpg\tunsafe-name" in out and "/abs/x.jpg\tunsafe-name" in out
    fixed = members(tmp_path / "fixed" / "evil.tar")
    assert sorted(fixed) == sorted(members(paths[0]))
    with pytest.warns(RuntimeWarning, match="absolute or '..' name"):
        loader = build_loader(str(evil), 4, 32, 16, decoder="cpu", num_workers=0, epochs=1, device="cpu")
    assert loader.table.skipped["unsafe_name"] == 3 and len(loader.table) == 4
    assert all(".." not in k and "/abs" not in k for k in next(iter(loader))["key"])
    with pytest.raises(DataError, match="over the limit") as e:  # counted, not expanded
        expand_sources(str(tmp_path / "{0..999999999}.tar"))
    one_line(e)
    p = _launch(tmp_path / "run", "--steps", "2", "--data", str(tmp_path / "{0..999999999}.tar"))
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 1 and "over the limit" in log and "Traceback" not in log, log


@pytest.mark.gpu
def test_truncated_jpeg_on_the_gpu_loaders(tmp_path):
    """The same rule on the GPU decoders (nvJPEG, DALI "mixed"), which half-decode a truncated JPEG."""
    from m3ae_engine.data import nvjpeg_available
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    paths, _ = write_test_shards(str(tmp_path), num_shards=1, per_shard=8, grey=(), cmyk=())
    trunc = tmp_path / "trunc.tar"
    plant(paths[0], trunc, {"000000002.jpg": members(paths[0])["000000002.jpg"][:-30]})
    decoders = [d for d, ok in (("nvjpeg", nvjpeg_available()), ("dali", dali_available())) if ok]
    if not decoders:
        pytest.skip("neither nvJPEG (torchvision) nor DALI available")
    for decoder in decoders:
        extra = {"max_corrupt_fraction": 1.0} if decoder == "nvjpeg" else {}
        loader = build_loader(str(trunc), 8, 32, 16, decoder=decoder, device="cuda", epochs=1, shuffle=False,
                              **extra)
        with pytest.warns(RuntimeWarning, match="000000002"):
            (batch,) = list(loader)
        assert loader.corrupt_count == 1 and batch["image"].shape == (8, 3, 32, 32), decoder
        assert not any(k.endswith(":000000002") for k in batch["key"]), decoder
