"""benchmarks/_profile.py (kernel-name categories, the per-step breakdown) and a CPU smoke run of
benchmarks/step_profile.py (no timing assertions)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _profile  # noqa: E402
import step_profile  # noqa: E402


@pytest.mark.parametrize("name,category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1_execute_kernel__5x_cublas", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false>, true>(Flash_fwd_params)",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void m3ae::(anonymous namespace)::copy_rows_kernel<__nv_bfloat16, 8>(...)", "engine fused ops"),
    ("_ce_chunk_kernel", "engine fused ops"),
    ("_gather_fwd_kernel", "engine fused ops"),
    ("triton_poi_fused__to_copy_add_gelu_0", "compiled (inductor)"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(...)", "layer norm"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("Memcpy HtoD (Pinned -> Device)", "copy / cast / fill"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>", "copy / cast / fill"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<...>>>",
     "reduction / softmax"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(...)>", "elementwise"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_names_fall_in_their_category(name, category):
    assert _profile.categorize(name) == category


def test_breakdown_adds_up():
    events = [("nvjet_tst_x", 3000.0), ("nvjet_tst_x", 1000.0), ("_ce_chunk_kernel", 500.0), ("other_k", 500.0)]
    b = _profile.breakdown(events, steps=2, step_ms=3.0)
    assert b["busy_ms"] == pytest.approx(2.5) and b["idle_ms"] == pytest.approx(0.5)
    assert b["launches_per_step"] == 2
    assert [c["category"] for c in b["categories"]] == ["matmul", "engine fused ops", "other"]
    assert b["categories"][0]["pct_of_step"] == pytest.approx(100 * 2.0 / 3.0)
    assert b["top_kernels"][0]["name"] == "nvjet_tst_x" and b["top_kernels"][0]["ms_per_step"] == pytest.approx(2.0)


def test_user_annotation_spans_are_not_counted_as_kernels():
    """A GPU user annotation (e.g. Optimizer.step) spans other kernels: counting it would count them twice."""
    import torch

    class Event:
        def __init__(self, name, us, annotation=False):
            self.name, self.is_user_annotation = name, annotation
            self.device_type = torch.autograd.DeviceType.CUDA
            self.time_range = type("R", (), {"elapsed_us": lambda _self: us})()

    class Prof:
        def events(self):
            return [Event("nvjet_tst_x", 10.0), Event("Optimizer.step#AdamW.step", 50.0, annotation=True)]

    assert list(_profile.device_events(Prof(), cuda=True)) == [("nvjet_tst_x", 10.0)]


def test_step_profile_smoke_on_cpu(tmp_path):
    result = step_profile.main(["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--variants", "engine",
                                "--steps", "1", "--warmup", "1", "--profile-steps", "1", "--out-dir", str(tmp_path)])
    (r,) = result["results"]
    assert r["status"] == "ok", r
    assert r["busy_ms"] > 0 and r["launches_per_step"] > 0
    assert sum(c["ms_per_step"] for c in r["categories"]) == pytest.approx(r["busy_ms"])
    assert {"matmul", "optimizer"} <= {c["category"] for c in r["categories"]}
    md = Path(result["json_path"]).with_suffix(".md").read_text()
    assert "**engine**: step" in md and "| category |" in md
