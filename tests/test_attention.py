"""Packed (varlen) attention: every backend against an independent padded computation.

CPU: the math and sdpa backends run for real; the GPU-only kernels' wrapper logic (filler rows,
dtype casts, backend choice) runs through stand-in kernels. `pytest -m gpu`: every available backend
against float64 math at M3AE-large shapes with FlashAttention-style tolerances.
"""
import math

import pytest
import torch

from m3ae_engine.model import attention as A
from m3ae_engine.model.config import M3AEConfig
from m3ae_engine.model.masking import SequenceLayout
from m3ae_engine.model.m3ae import M3AE


def make_layout(lengths, filler=0, device="cpu"):
    """cu_seqlens [B+1] int32, rows (with `filler` extra rows past the last sequence)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu.to(device), int(cu[-1]) + filler


def padded_reference(qkv, lengths, scale=None):
    """Independent oracle: pad each sequence with Python slicing, attend with an additive key mask,
    unpad by slicing; rows past the last sequence are zeros. qkv [T, 3, H, Dh] -> [T, H, Dh]."""
    t, _, h, dh = qkv.shape
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    b, s = len(lengths), max(max(lengths), 1)
    seqs, start = [], 0
    for n in lengths:  # pad each sequence to s rows by concatenation
        seqs.append(torch.cat([qkv[start:start + n], qkv.new_zeros(s - n, 3, h, dh)]))
        start += n
    qp = torch.stack(seqs)  # [B, S, 3, H, Dh]
    q, k, v = (x.permute(0, 2, 1, 3) for x in qp.unbind(2))  # [B, H, S, Dh]
    key_ok = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # [B, S]
    bias = torch.where(key_ok, 0.0, -1e30).to(qkv.dtype)[:, None, None, :]
    p = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, -1)
    out_p = (p @ v).permute(0, 2, 1, 3)  # [B, S, H, Dh]
    pieces = [out_p[i, :n] for i, n in enumerate(lengths)]
    out = torch.cat(pieces + [qkv.new_zeros(t - start, h, dh)], 0)
    return out


def random_lengths(gen, b, max_len):
    lengths = torch.randint(1, max_len + 1, (b,), generator=gen).tolist()
    lengths[0] = 1  # length-1 sequences attend only to themselves
    lengths[-1] = max_len
    if b > 3:
        lengths[2] = 1
    return lengths


# ------------------------------------------------------------------------------------------------
# math and sdpa (CPU) against the independent oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("head_dim,filler", [(64, 0), (32, 5), (16, 1)])
def test_packed_matches_padded_reference(backend, head_dim, filler):
    gen = torch.Generator().manual_seed(head_dim + filler)
    lengths = random_lengths(gen, 6, 9)
    cu, rows = make_layout(lengths, filler)
    qkv = torch.randn(rows, 3, 3, head_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    qkv_ref = qkv.detach().clone().requires_grad_(True)
    out = A.varlen_attention_qkvpacked(qkv, cu, max(lengths) + 2, backend=backend)  # loose upper bound
    ref = padded_reference(qkv_ref, lengths)
    assert out.shape == (rows, 3, head_dim) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if filler:
        assert torch.equal(out[rows - filler:], torch.zeros_like(out[rows - filler:]))
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(qkv.grad, qkv_ref.grad, rtol=1e-9, atol=1e-10)
    if filler:
        assert torch.equal(qkv.grad[rows - filler:], torch.zeros_like(qkv.grad[rows - filler:]))


def test_separate_qkv_equals_packed_and_custom_scale():
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 4, 7, 2]
    cu, rows = make_layout(lengths, 3)
    qkv = torch.randn(rows, 3, 2, 8, generator=gen, dtype=torch.float64)
    q, k, v = (t.clone().requires_grad_(True) for t in qkv.unbind(1))
    out = A.varlen_attention(q, k, v, cu, 7, backend="math", scale=0.3)
    torch.testing.assert_close(out, padded_reference(qkv, lengths, scale=0.3), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(A.varlen_attention_qkvpacked(qkv, cu, 7, backend="sdpa", scale=0.3), out)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and k.grad.abs().sum() > 0


def test_single_sequence_matches_full_softmax():
    """One sequence, no padding: plain softmax attention, checked without any masking code."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(5, 3, 2, 4, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    q, k, v = (t.transpose(0, 1) for t in qkv.unbind(1))  # [H, T, Dh]
    ref = (torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v).transpose(0, 1)
    torch.testing.assert_close(A.varlen_attention_qkvpacked(qkv, cu, 5, backend="math"), ref)


def test_low_precision_math_returns_input_dtype_and_ignores_autocast():
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 1, 5]
    cu, rows = make_layout(lengths, 2)
    qkv = torch.randn(rows, 3, 2, 32, generator=gen)
    ref = padded_reference(qkv.double(), lengths)
    out = A.varlen_attention_qkvpacked(qkv.bfloat16(), cu, 5, backend="math")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the oracle must stay float32 inside
        out32 = A.varlen_attention_qkvpacked(qkv, cu, 5, backend="math")
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# wrapper logic of the GPU kernels, exercised with stand-in kernels on the CPU
# ------------------------------------------------------------------------------------------------
class _PoisonFiller(torch.autograd.Function):
    """NaN in the rows outside the sequences, forward and backward; the rows inside pass through."""

    @staticmethod
    def forward(ctx, x, inside):
        ctx.save_for_backward(inside)
        return torch.where(inside, x, float("nan"))

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, float("nan")), None


def _garbage_kernel(seen):
    """A stand-in half-precision varlen kernel: right inside the sequences, NaN in the filler rows of
    its output and of its input gradient (real kernels leave those rows unwritten)."""
    def kernel(qkv, cu, max_seqlen, scale):
        seen.append(qkv.dtype)
        if qkv.dtype not in (torch.float16, torch.bfloat16):
            raise AssertionError("half-only kernel received " + str(qkv.dtype))
        inside = (torch.arange(qkv.shape[0]) < cu[-1])[:, None, None]  # [T, 1, 1]
        good = A._math_impl(_PoisonFiller.apply(qkv, inside[:, None]), cu, max_seqlen, scale)
        return _PoisonFiller.apply(good, inside)
    return kernel


@pytest.fixture
def fake_torch_varlen(monkeypatch):
    seen = []
    monkeypatch.setitem(A._IMPLS, "torch_varlen", _garbage_kernel(seen))
    real_probe = A._probe
    monkeypatch.setattr(A, "_probe",
                        lambda name, device=None: None if name == "torch_varlen" else real_probe(name, device))
    return seen


def test_filler_rows_zero_whatever_the_kernel_writes(fake_torch_varlen):
    gen = torch.Generator().manual_seed(4)
    lengths = [2, 1, 6]
    cu, rows = make_layout(lengths, 4)
    qkv = torch.randn(rows, 3, 2, 16, generator=gen).requires_grad_(True)
    out = A.varlen_attention_qkvpacked(qkv, cu, 6, backend="torch_varlen")  # fp32 in -> bf16 kernel
    assert fake_torch_varlen == [torch.bfloat16] and out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.equal(out[-4:], torch.zeros_like(out[-4:]))
    torch.testing.assert_close(out, padded_reference(qkv.detach(), lengths), rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert torch.isfinite(qkv.grad).all(), "filler-row gradient garbage leaked"
    assert torch.equal(qkv.grad[-4:], torch.zeros_like(qkv.grad[-4:]))
    # exact=True promises no filler: the kernel's rows are passed through untouched
    cu2, rows2 = make_layout(lengths, 0)
    out2 = A.varlen_attention_qkvpacked(qkv.detach()[:rows2], cu2, 6, backend="torch_varlen", exact=True)
    torch.testing.assert_close(out2, out.detach()[:rows2])


def test_head_dim_the_kernel_lacks(fake_torch_varlen):
    cu, rows = make_layout([3, 2], 0)
    with pytest.raises(ValueError, match="multiple of 8 and <= 256, got 12.*sdpa_efficient"):
        A.varlen_attention_qkvpacked(torch.randn(rows, 3, 2, 12), cu, 3, backend="torch_varlen")
    assert fake_torch_varlen == []


def test_cast_follows_autocast_dtype(fake_torch_varlen):
    cu, rows = make_layout([3, 2], 1)
    qkv = torch.randn(rows, 3, 2, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        out = A.varlen_attention_qkvpacked(qkv, cu, 3, backend="torch_varlen")
    assert fake_torch_varlen == [torch.float16] and out.dtype == torch.float32
    out = A.varlen_attention_qkvpacked(qkv.half(), cu, 3, backend="torch_varlen")
    assert fake_torch_varlen[-1] == torch.float16 and out.dtype == torch.float16


def test_context_on_capacity_layout(fake_torch_varlen):
    """The model's entry point on a GPU-style capacity layout (exact=False, filler tail)."""
    lengths = [4, 1, 3]
    cu, rows = make_layout(lengths, 6)
    lay = SequenceLayout(cu, 5, rows, False, 3, 5, True, None)
    qkv = torch.randn(rows, 3, 2, 8, dtype=torch.bfloat16)
    for backend in ("torch_varlen", "math", "sdpa"):
        ctx = A.AttentionContext.build(lay, backend, "cpu")
        out = A.attention(qkv, ctx)
        assert out.shape == (rows, 2, 8) and out.dtype == torch.bfloat16
        assert torch.equal(out[-6:], torch.zeros_like(out[-6:]))
        torch.testing.assert_close(out.double(), padded_reference(qkv.double(), lengths), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# backend choice and errors
# ------------------------------------------------------------------------------------------------
def test_auto_order_and_full_precision(monkeypatch):
    assert set(A.AUTO_ORDER) == set(A.BACKENDS) and A.AUTO_ORDER[-1] == "math"
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    assert A.resolve_backend(None, "cpu") == "math"
    up = {"torch_varlen", "sdpa_efficient", "sdpa"}
    monkeypatch.setattr(A, "_probe", lambda name, device=None: None if name in up or name == "math" else "absent")
    first = [n for n in A.AUTO_ORDER if n in up][0]
    assert A.resolve_backend(None, "cuda:0") == first
    assert A.resolve_backend("auto", "cuda:0", torch.bfloat16) == first
    full = [n for n in A.AUTO_ORDER if n in up and n not in A.HALF_ONLY][0]
    assert A.resolve_backend(None, "cuda:0", torch.float32) == full
    assert A.resolve_backend(None, "cuda:0", torch.float64) == "math"
    monkeypatch.setattr(A, "_autocast_dtype", lambda device_type: torch.bfloat16)  # as under CUDA autocast
    assert A.resolve_backend(None, "cuda:0", torch.float32) == first  # the half-only kernels are fine again
    no_flash = [n for n in A.AUTO_ORDER if n in up and n not in A._FLASH_HEAD_DIM][0]
    assert A.resolve_backend(None, "cuda:0", torch.bfloat16, head_dim=12) == no_flash  # FA needs Dh % 8 == 0
    monkeypatch.setenv(A.ENV_VAR, "sdpa")
    assert A.resolve_backend(None, "cuda:0") == "sdpa"
    assert A.resolve_backend("torch_varlen", "cuda:0") == "torch_varlen"  # the argument beats the env


def test_unknown_and_unavailable_backends(monkeypatch):
    qkv = torch.randn(4, 3, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*flash_attn, torch_varlen"):
        A.varlen_attention_qkvpacked(qkv, cu, 4, backend="flash")
    monkeypatch.setenv(A.ENV_VAR, "nope")
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope' \(from M3AE_ATTENTION\)"):
        A.varlen_attention_qkvpacked(qkv, cu, 4)
    monkeypatch.delenv(A.ENV_VAR)
    for name in ("flash_attn", "torch_varlen", "xformers", "sdpa_cudnn", "sdpa_efficient"):
        with pytest.raises(A.AttentionBackendUnavailable, match=rf"'{name}' is unavailable.*available: sdpa, math"):
            A.varlen_attention_qkvpacked(qkv, cu, 4, backend=name)
    report = A.available_backends("cpu")
    assert report["math"] == "available" and report["sdpa"] == "available"
    assert "GPU" in report["torch_varlen"]


def test_trial_probe_runs_inside_no_grad_and_reports_failures(monkeypatch):
    """The first model call may be in eval mode: the trial still runs forward+backward there, and
    leaves the caller's random stream alone. (The trial is CUDA-only in use; its body runs on the CPU.)"""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    cpu = torch.device("cpu")
    state = torch.get_rng_state()
    with torch.inference_mode():
        assert A._trial("sdpa", cpu) is None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert A._trial("math", cpu) is None
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setitem(A._IMPLS, "sdpa_efficient", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel")))
    assert "RuntimeError: no kernel" in A._trial("sdpa_efficient", cpu)


def test_bad_inputs_give_clear_errors():
    qkv = torch.randn(6, 3, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="qkv must be"):
        A.varlen_attention_qkvpacked(qkv[:, :2], cu, 4)
    with pytest.raises(ValueError, match="Python int"):
        A.varlen_attention_qkvpacked(qkv, cu, torch.tensor(4))
    with pytest.raises(ValueError, match="length 4 > max_seqlen 3"):
        A.varlen_attention_qkvpacked(qkv, cu, 3)
    with pytest.raises(ValueError, match="exceeds the 5 packed rows"):
        A.varlen_attention_qkvpacked(qkv[:5], cu, 4)
    with pytest.raises(ValueError, match="int32"):
        A.varlen_attention_qkvpacked(qkv, cu.float(), 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        A.varlen_attention_qkvpacked(qkv, torch.tensor([0, 4, 2], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="same shape"):
        A.varlen_attention(qkv[:, 0], qkv[:, 1, :1], qkv[:, 2], cu, 4)
    with pytest.raises(ValueError, match="floating point"):
        A.varlen_attention_qkvpacked(qkv.long(), cu, 4)


# ------------------------------------------------------------------------------------------------
# the whole model: packed == padded-with-mask
# ------------------------------------------------------------------------------------------------
def _tiny_batch(cfg, b, gen):
    image = torch.rand(b, 3, cfg.image_size, cfg.image_size, generator=gen)
    lengths = torch.tensor([1, cfg.text_length, 3, 9, 17][:b])
    text_padding_mask = (torch.arange(cfg.text_length)[None, :] >= lengths[:, None]).long()
    text = torch.randint(1, cfg.vocab_size, (b, cfg.text_length), generator=gen) * (1 - text_padding_mask)
    image_noise = torch.rand(b, cfg.num_patches, generator=gen)
    text_noise = torch.rand(b, cfg.text_length, generator=gen)
    return image, text, text_padding_mask, image_noise, text_noise


def test_model_packed_equals_padded():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    packed = M3AE(M3AEConfig.from_preset("tiny", vocab_size=97, packed=True, attention="math"))
    padded = M3AE(M3AEConfig.from_preset("tiny", vocab_size=97, packed=False, attention="math"))
    padded.load_state_dict(packed.state_dict())
    image, text, pad, inoise, tnoise = _tiny_batch(packed.config, 5, gen)
    outs = []
    for model in (packed, padded):
        out = model(image, text, pad, image_noise=inoise, text_noise=tnoise)
        out.loss.backward()
        outs.append(out)
    assert outs[0].plan.enc.rows < outs[1].plan.enc.rows  # packing dropped the padded text
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].image_loss, outs[1].image_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].text_loss, outs[1].text_loss, rtol=1e-5, atol=1e-6)
    grads_padded = dict(padded.named_parameters())
    for name, p in packed.named_parameters():
        q = grads_padded[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_model_sdpa_backend_on_cpu_matches_math():
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    a = M3AE(M3AEConfig.from_preset("tiny", vocab_size=97, attention="math"))
    b = M3AE(M3AEConfig.from_preset("tiny", vocab_size=97, attention="sdpa"))
    b.load_state_dict(a.state_dict())
    image, text, pad, inoise, tnoise = _tiny_batch(a.config, 3, gen)
    la = a(image, text, pad, image_noise=inoise, text_noise=tnoise).loss
    lb = b(image, text, pad, image_noise=inoise, text_noise=tnoise).loss
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# GPU: every available backend against float64 math at M3AE-large shapes
# ------------------------------------------------------------------------------------------------
def realistic_lengths(stack: str, batch: int, gen: torch.Generator):
    """Per-sample lengths of M3AE-large at 256 px / 64 text tokens with 75% masking.

    encoder: CLS + 64 kept patches + the kept text positions that are not padding (16 kept of 64)
    decoder: CLS + 256 patches + the non-padded text positions. Caption lengths ~ U[5, 64]."""
    caption = torch.randint(5, 65, (batch,), generator=gen)
    if stack == "decoder":
        return (1 + 256 + caption).tolist(), 1 + 256 + 64
    kept = torch.rand(batch, 64, generator=gen).argsort(1)[:, :16]  # kept text positions
    n_text = (kept < caption[:, None]).sum(1)
    return (1 + 64 + n_text).tolist(), 1 + 64 + 16


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _gpu_backends():
    """Backends installed and suited to this GPU (static checks only): one whose trial call fails is
    still tested, so a broken kernel shows up as a failure instead of dropping out of the list."""
    if not torch.cuda.is_available():
        return []
    return [n for n in A.BACKENDS if n != "math" and A._static_probe(n, torch.device("cuda")) is None]


GPU_CASES = [(s, d, lay) for s in ("encoder", "decoder") for d in ("float32", "bfloat16")
             for lay in ("exact", "capacity")]


def check_against_fp64_math(backends, stack, dtype, layout, dev, batch=256, heads=16):
    """Every backend vs float64 math, forward and backward, FlashAttention-style tolerance.
    Returns the list of failures (empty = pass)."""
    gen = torch.Generator().manual_seed(7)
    dh = 64 if stack == "encoder" else 32
    lengths, max_seqlen = realistic_lengths(stack, batch, gen)
    cu, rows = make_layout(lengths, batch * max_seqlen - sum(lengths) if layout == "capacity" else 0, dev)
    qkv = torch.randn(rows, 3, heads, dh, generator=gen).to(dev, dtype)
    grad_out = torch.randn(rows, heads, dh, generator=gen).to(dev, dtype)
    if layout == "capacity":  # filler rows hold whatever the last step left there; they must not matter
        qkv[sum(lengths):] = 1e3

    def run(fn, in_dtype):
        x = qkv.detach().to(in_dtype).requires_grad_(True)
        out = fn(x)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), x.grad.detach()

    ref_out, ref_grad = run(lambda x: A.varlen_attention_qkvpacked(x, cu, max_seqlen, "math"), torch.float64)
    low_cache = {}
    failures = []
    for name in backends:
        # the precision the kernel computes in: half-only kernels round float32 inputs to bf16
        compute = torch.bfloat16 if dtype == torch.float32 and name in A.HALF_ONLY else dtype
        if compute not in low_cache:  # the same math done in that precision: the error budget
            low_cache[compute] = run(lambda x: A._math_impl(x, cu, max_seqlen, None, compute_dtype=compute),
                                     compute)
        low_out, low_grad = low_cache[compute]
        try:  # one backend refusing these shapes must not hide the others' results
            out, grad = run(lambda x: A.varlen_attention_qkvpacked(x, cu, max_seqlen, name,
                                                                   exact=(layout == "exact")), dtype)
        except Exception as e:
            failures.append(f"{name}: raised {type(e).__name__}: {str(e)[:300]}")
            continue
        n = sum(lengths)
        if out.dtype != dtype:
            failures.append(f"{name}: returned {out.dtype} for {dtype} inputs")
        if layout == "capacity" and not (torch.equal(out[n:], torch.zeros_like(out[n:]))
                                         and torch.equal(grad[n:], torch.zeros_like(grad[n:]))):
            failures.append(f"{name}: filler rows of the output or of the gradient are not zero")
        # FlashAttention's test rule: error <= 2 x (error of the same math in low precision) + rounding atol
        eps = torch.finfo(compute).eps
        for what, got, low, ref in (("out", out[:n], low_out[:n], ref_out[:n]),
                                    ("dq", grad[:n, 0], low_grad[:n, 0], ref_grad[:n, 0]),
                                    ("dk", grad[:n, 1], low_grad[:n, 1], ref_grad[:n, 1]),
                                    ("dv", grad[:n, 2], low_grad[:n, 2], ref_grad[:n, 2])):
            err, budget = _max_err(got, ref), _max_err(low, ref)
            # rounding of the result itself (FlashAttention's atol); float32 kernels may reorder sums more
            atol = (2 * eps if compute != torch.float32 else 1e-5) * ref.abs().max().item()
            if not (torch.isfinite(got).all() and err <= 2 * budget + atol):
                failures.append(f"{name} {what}: err {err:.3e} > 2 x {budget:.3e} + {atol:.1e}")
    return failures


@pytest.mark.gpu
@pytest.mark.parametrize("stack,dtype_name,layout", GPU_CASES)
def test_gpu_backends_against_fp64_math(stack, dtype_name, layout):
    backends = _gpu_backends()
    assert backends, A.available_backends("cuda")  # sdpa always passes the static checks on a GPU
    failures = check_against_fp64_math(backends, stack, getattr(torch, dtype_name), layout, torch.device("cuda"))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("stack,layout", [("encoder", "capacity"), ("decoder", "exact")])
def test_fp64_harness_on_cpu(stack, layout, fake_torch_varlen):
    """The GPU test's harness at small batch on the CPU: sdpa and a stand-in half kernel pass, and a
    kernel with a wrong scale fails (so the tolerance rule can fail)."""
    dev = torch.device("cpu")
    assert check_against_fp64_math(["sdpa", "torch_varlen"], stack, torch.bfloat16, layout, dev, 3, 2) == []
    assert check_against_fp64_math(["torch_varlen"], stack, torch.float32, layout, dev, 3, 2) == []
    good = A._IMPLS["torch_varlen"]
    A._IMPLS["torch_varlen"] = lambda qkv, cu, s, scale: good(qkv, cu, s, 1.05 / math.sqrt(qkv.shape[-1]))
    try:
        failures = check_against_fp64_math(["torch_varlen"], stack, torch.bfloat16, layout, dev, 3, 2)
    finally:
        A._IMPLS["torch_varlen"] = good
    assert any("torch_varlen out" in f for f in failures), failures


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto"] + [n for n in A.BACKENDS if n != "math"])
def test_gpu_model_packed_capacity_equals_padded(backend):
    """The plan built on the GPU (capacity layout, filler tails) gives the padded model's loss."""
    if backend != "auto":
        why = A._static_probe(backend, torch.device("cuda"))
        if why is not None:  # not installed / not for this GPU: a genuine absence
            pytest.skip(f"{backend}: {why}")
        assert A._probe(backend, "cuda") is None, A._probe(backend, "cuda")  # installed but broken: a failure
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, attention=backend)
    packed = M3AE(M3AEConfig.from_preset("tiny", packed=True, **cfg)).to(dev)
    padded = M3AE(M3AEConfig.from_preset("tiny", packed=False, attention="math", vocab_size=97)).to(dev)
    padded.load_state_dict(packed.state_dict())
    image, text, pad, inoise, tnoise = _tiny_batch(packed.config, 5, gen)
    args = [t.to(dev) for t in (image, text, pad, inoise, tnoise)]
    out_p = packed(*args[:3], image_noise=args[3], text_noise=args[4])
    assert not out_p.plan.enc.exact, "the plan should have been built on the GPU (capacity layout)"
    out_r = padded(*args[:3], image_noise=args[3], text_noise=args[4])
    out_p.loss.backward()
    out_r.loss.backward()
    half = A.resolve_backend(None if backend == "auto" else backend, dev, torch.float32) in A.HALF_ONLY
    tol = dict(rtol=3e-2, atol=3e-3) if half else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_p.loss, out_r.loss, **tol)
    for (name, p), q in zip(packed.named_parameters(), padded.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not half:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
