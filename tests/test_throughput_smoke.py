"""benchmarks/throughput.py on the CPU: tiny preset, 2 steps, reference and engine; no timing assertions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import report  # noqa: E402
from shard_helpers import members  # noqa: E402
import throughput  # noqa: E402
from m3ae_engine import M3AEConfig  # noqa: E402


def test_throughput_smoke_writes_json_markdown(tmp_path):
    result = throughput.main(["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--steps", "2",
                              "--warmup", "1", "--num-batches", "2", "--variants", "reference,engine",
                              "--out-dir", str(tmp_path)])
    files = list(tmp_path.glob("throughput_tiny_b2_*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert [r["variant"] for r in saved["results"]] == ["reference", "engine"]
    for r in saved["results"]:
        assert r["status"] == "ok", r
        assert r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["model_tflops"] > 0
        assert r["loss_first"] > 0
    ref, eng = saved["results"]
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    # same model FLOPs for MFU; the reference executes more (padded, heads on all positions)
    assert ref["executed_flops_per_sample"] > saved["flops"]["model_per_sample"] == eng["executed_flops_per_sample"]
    for key in ("device", "torch", "triton", "cuda", "driver", "git_commit", "date"):
        assert key in saved["meta"]
    assert saved["captions"]["mean_tokens"] > 3
    md = files[0].with_suffix(".md").read_text()
    assert "| reference | ok |" in md and "| engine | ok |" in md
    assert result["json_path"] == str(files[0])


def test_failed_variant_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    original = throughput.Runner.step

    def broken(self, batch):
        if self.kind == "reference":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, batch)

    monkeypatch.setattr(throughput.Runner, "step", broken)
    result = throughput.main(["--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                              "--num-batches", "1", "--variants", "reference,engine", "--out-dir", str(tmp_path)])
    status = {r["variant"]: r["status"] for r in result["results"]}
    assert status == {"reference": "OOM", "engine": "ok"}
    assert "OOM" in report.markdown(result)


def test_loader_in_the_loop_reports_its_decoder_and_data_wait(tmp_path):
    """--data cpu: the WebDataset loader (Pillow decoder) feeds the steps from shards it writes itself."""
    result = throughput.main(["--device", "cpu", "--preset", "tiny", "--batch-size", "4", "--steps", "2",
                              "--warmup", "1", "--variants", "engine", "--data", "cpu", "--out-dir", str(tmp_path)])
    assert result["data"]["loader"] == "cpu" and "synthetic JPEGs" in result["data"]["source"]
    (r,) = result["results"]
    assert r["status"] == "ok", r
    assert r["data_wait_ms"] >= 0 and r["samples_per_s"] > 0
    assert "Data: the WebDataset loader in the loop, decoder cpu" in report.markdown(result)


def test_max_batch_with_deepspeed_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="max-batch"):
        throughput.main(["--device", "cpu", "--max-batch", "--deepspeed_config", "ds.json", "--out-dir", str(tmp_path)])


def test_shards_are_made_with_spawned_workers_once_cuda_is_initialised(tmp_path, monkeypatch):
    """fork after CUDA initialisation is unsafe: make_shards then uses spawned workers (same JPEGs)."""
    import dataloader
    forked = dataloader.make_shards(str(tmp_path / "fork"), 6, 4, 32, 48)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    spawned = dataloader.make_shards(str(tmp_path / "spawn"), 6, 4, 32, 48)
    assert [members(p) for p in forked] == [members(p) for p in spawned]  # (headers hold the write time)


@pytest.mark.parametrize("ds_config", ["ds.json", "configs/zero3.json"])
def test_deepspeed_variant_runs_the_trainers_runtime(ds_config, tmp_path):
    """--deepspeed_config goes through m3ae_engine.train.runtime.DeepSpeedRuntime, as train.py does ("auto"
    fields filled, bf16 off on the CPU, ZeRO-3 hooks): the same first loss as the plain engine. (Its own
    copy of deepspeed.initialize failed here on bf16 weights vs fp32 inputs. The ZeRO-3 registration
    of the vocabulary head only matters with >1 rank: tests/test_train_distributed.py checks it.)"""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install m3ae-engine[deepspeed])")
    root = Path(__file__).resolve().parent.parent
    common = ["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "1",
              "--num-batches", "1", "--variants", "engine"]
    plain = throughput.main(common + ["--out-dir", str(tmp_path / "plain")])["results"][0]
    # DeepSpeed initialises torch.distributed: keep it out of the test process
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "throughput.py"), *common,
                           "--deepspeed_config", str(root / ds_config), "--out-dir", str(tmp_path / "ds")],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = json.loads(next((tmp_path / "ds").glob("*.json")).read_text())["results"][0]
    assert ds["variant"] == "engine+ds" and ds["status"] == "ok", ds
    assert ds["deepspeed"]["zero_optimization"]["stage"] == (3 if "zero3" in ds_config else 2)
    assert ds["loss_first"] == pytest.approx(plain["loss_first"], rel=1e-5)


@pytest.mark.parametrize("largest,start,limit", [(37, 4, 1024), (4, 4, 1024), (1000, 8, 512), (3, 16, 64)])
def test_find_max_batch_doubles_then_bisects(largest, start, limit):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= largest

    out = throughput.find_max_batch(fits, start, limit, tolerance=0)
    assert out["max_batch"] == min(largest, limit)
    assert out["limit_reached"] == (largest >= limit)
    assert len(calls) <= 2 * (limit.bit_length() + 1)


def test_caption_lengths_follow_the_stated_distribution():
    gen = torch.Generator().manual_seed(0)
    n = throughput.caption_lengths(20000, 64, gen)
    assert n.min() >= 3 and n.max() <= 64
    assert 13 <= float(n.double().median()) <= 15  # median ~14 BERT tokens (CC12M-like)
    d = throughput.caption_distribution(64, False)
    assert 15 < d["mean_tokens"] < 19
    assert throughput.caption_distribution(64, True)["mean_tokens"] == 64
    assert throughput.device_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert throughput.device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert throughput.device_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert throughput.device_peak_tflops("Some GPU") is None
    # text stays on the CPU, padding mask matches the lengths
    c = M3AEConfig.from_preset("tiny")
    b = throughput.make_batches(1, 5, c, torch.device("cpu"), False, 0)[0]
    assert torch.equal((1 - b.text_padding_mask).sum(1).long(), b.lengths)
    assert ((b.text != 0) == (b.text_padding_mask == 0)).all()


def test_cpu_run_says_smoke_test_reports_spread_and_writes_outside_tracked_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(throughput, "ROOT", tmp_path)  # the default folder is relative to the checkout
    result = throughput.main(["--device", "cpu", "--batch-size", "2", "--steps", "3", "--warmup", "1",
                              "--num-batches", "1", "--variants", "engine"])
    out = capsys.readouterr().out
    assert "smoke test" in out and "say nothing about GPU speed" in out
    assert Path(result["json_path"]).parent == tmp_path / "runs" / "benchmarks"
    assert "smoke test" in Path(result["json_path"]).with_suffix(".md").read_text()
    (r,) = result["results"]
    assert r["timed_steps"] == 3 and r["step_ms_p10"] <= r["step_ms"] <= r["step_ms_p90"]
    defaults = throughput.parse_args([])
    assert defaults.steps >= 20 and defaults.warmup >= 3 and defaults.out_dir is None
