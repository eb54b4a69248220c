"""benchmarks/kernels.py: the CPU smoke run (Triton interpreter) writes its JSON and markdown; on a GPU
every fused backend's forward+backward is captured in a CUDA graph (the device clock the floors are
compared with). No timing assertions."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kernels as kernels_bench  # noqa: E402


def _check_rows(rows, backends):
    assert {(r["op"], r["backend"]) for r in rows} == {(op, b) for op in kernels_bench.OPS for b in backends}
    for r in rows:
        assert "error" not in r, r
        assert r["fwd_bwd_ms"] > 0 and r["fwd_bwd_eager_ms"] > 0 and r["host_us_fwd_bwd"] > 0
        assert r["pct_copy_bw"] > 0
        if r["op"] == "linear_cross_entropy":
            assert r["time_over_matmuls"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU check")
def test_kernels_smoke_writes_json_and_markdown(tmp_path):
    out = tmp_path / "kernels.json"
    rows = kernels_bench.main(["--smoke", "--dtypes", "bf16", "--backends", "torch,triton", "--out", str(out)])
    _check_rows(rows, ("torch", "triton"))
    saved = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "cuda", "driver", "git_commit", "date"):
        assert key in saved["meta"]
    md = out.with_suffix(".md").read_text()
    assert md.count("| smoke | bf16 |") == len(rows)


@pytest.mark.gpu
def test_kernels_benchmark_captures_every_fused_backend_in_a_cuda_graph(tmp_path):
    from m3ae_engine import ops
    backends = [b for b in ("torch", "triton", "cuda") if ops.available_backends().get(b) == "available"]
    rows = kernels_bench.main(["--presets", "base", "--batch", "8", "--dtypes", "bf16",
                               "--backends", ",".join(backends), "--out", str(tmp_path / "kernels.json")])
    _check_rows(rows, backends)
    for r in rows:
        if r["backend"] != "torch":  # the fused ops never sync the host: they must be capturable
            assert r["clock"] == "device", r
            assert r["kernels_fwd_bwd"]["launches_per_call"] >= 1, r
