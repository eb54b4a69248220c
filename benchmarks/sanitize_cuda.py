"""Runs every CUDA kernel of m3ae_engine._C once (forward and backward) on small cases, vectorised
and scalar paths both, and checks the results against the references.

Meant for NVIDIA compute-sanitizer (out-of-bounds / misaligned accesses, races, uninitialised reads):

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool initcheck python benchmarks/sanitize_cuda.py

PyTorch's caching allocator is switched off (exact-size allocations) so an access past the end of
a tensor is an access past the end of its allocation. Exit status: 0 when every op matches its
reference, 1 on a mismatch, 2 when the CUDA backend is unavailable.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # before torch touches CUDA
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from m3ae_engine import ops
from m3ae_engine.ops import reference  # noqa: E402
from m3ae_engine.model.masking import build_plan  # noqa: E402

DEV = "cuda"
FAILURES = []


def check(name, got, want, rtol, atol_frac):
    got, want = got.float(), want.float()
    scale = want.abs().max().clamp_min(1e-30)
    ok = bool(torch.isfinite(got).all()) and torch.allclose(got / scale, want / scale, rtol=rtol, atol=atol_frac)
    err = ((got - want).abs().max() / scale).item() if got.shape == want.shape else float("inf")
    print(f"  {'ok  ' if ok else 'FAIL'} {name:<40} max err / max|ref| = {err:.2e}")
    if not ok:
        FAILURES.append(name)


def plan_for(b, li, ki, lt, kt, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, lt + 1, (b,), generator=g)
    pad = (torch.arange(lt)[None, :] >= lengths[:, None]).to(torch.int32)
    return build_plan(b, li, ki, pad, lt, kt, generator=g, device="cpu").to(DEV)


def run_gather(be, d, dtype):
    plan = plan_for(3, 9, 3, 7, 2, seed=d)
    img = torch.randn(3, 9, d, device=DEV, dtype=dtype, requires_grad=True)
    txt = torch.randn(3, 7, d, device=DEV, dtype=dtype, requires_grad=True)
    cls = torch.randn(d, device=DEV, requires_grad=True)
    src = plan.enc_row_source
    out = be.gather(img, txt, cls, src, plan.image_row_of, plan.text_row_of)
    ref = reference.gather(img, txt, cls, src)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (img, txt, cls), g)
    want = torch.autograd.grad(ref, (img, txt, cls), g)
    tag = f"gather D={d} {str(dtype)[6:]}"
    check(tag + " fwd", out, ref, 0, 0)
    for n, a, b in zip(("grad_image", "grad_text", "grad_cls"), got, want):
        check(f"{tag} {n}", a, b, 1e-5, 1e-5 if dtype == torch.float32 else 1e-2)


def run_unshuffle(be, d, dtype):
    plan = plan_for(3, 9, 3, 7, 2, seed=d + 1)
    t = plan.enc_row_source.numel()
    vis = torch.randn(t, d, device=DEV, dtype=dtype, requires_grad=True)
    mt = torch.randn(2, d, device=DEV, requires_grad=True)
    ty = torch.randn(2, d, device=DEV, requires_grad=True)
    pos = torch.randn(1 + 9 + 7, d, device=DEV)
    args = (plan.dec_row_visible, plan.dec_row_kind, plan.dec_row_pos)
    out = be.unshuffle(vis, mt, ty, pos, *args, plan.dec_row_of_visible)
    ref = reference.unshuffle(vis, mt, ty, pos, *args)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (vis, mt, ty), g)
    want = torch.autograd.grad(ref, (vis, mt, ty), g)
    tag = f"unshuffle D={d} {str(dtype)[6:]}"
    check(tag + " fwd", out, ref, 0, 0)
    for n, a, b in zip(("grad_visible", "grad_mask", "grad_type"), got, want):
        check(f"{tag} {n}", a, b, 1e-4, 1e-5)


def run_mse(be, dtype, img_dtype, norm_pix, p=4):
    b, c, h, w = 2, 3, 3 * p, 2 * p
    l = (h // p) * (w // p)
    if img_dtype == torch.uint8:
        imgs = torch.randint(0, 256, (b, c, h, w), device=DEV, dtype=torch.uint8)
        mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    else:
        imgs = torch.randn(b, c, h, w, device=DEV, dtype=img_dtype)
        mean = std = None
    idx = torch.tensor([0, 2, 5, l + 1, l + 4], dtype=torch.int32, device=DEV)
    wgt = torch.rand(5, device=DEV)
    pred = torch.randn(5, p * p * c, device=DEV, dtype=dtype, requires_grad=True)
    loss = be.masked_mse(pred, imgs, idx, wgt, p, norm_pix, mean, std)
    ref = reference.masked_mse(pred, imgs, idx, wgt, p, norm_pix, mean, std)
    tag = f"masked_mse p={p} {str(dtype)[6:]} img={str(img_dtype)[6:]} norm={int(norm_pix)}"
    check(tag + " fwd", loss, ref, 1e-4, 1e-6)
    check(tag + " grad_pred", torch.autograd.grad(loss, pred)[0], torch.autograd.grad(ref, pred)[0],
          1e-5 if dtype == torch.float32 else 1.6e-2, 1e-5 if dtype == torch.float32 else 1e-2)


def run_lce(be, n, d, v, dtype, chunk_bytes):
    import m3ae_engine.ops.cuda_backend as cb
    old = cb.LCE_CHUNK_BYTES
    cb.LCE_CHUNK_BYTES = chunk_bytes
    try:
        h = torch.randn(n, d, device=DEV).to(dtype).requires_grad_(True)
        w = (torch.randn(v, d, device=DEV) / d ** 0.5).requires_grad_(True)
        bias = torch.randn(v, device=DEV, requires_grad=True)
        t = torch.randint(0, v, (n,), device=DEV)
        rw = torch.rand(n, device=DEV)
        rw[0] = 0.0
        loss, acc = be.linear_cross_entropy(h, w, bias, t, rw)
        rloss, racc = reference.masked_linear_cross_entropy(h, w, bias, t, rw)
        got = torch.autograd.grad(loss, (h, w, bias))
        want = torch.autograd.grad(rloss, (h, w, bias))
    finally:
        cb.LCE_CHUNK_BYTES = old
    tag = f"lce V={v} {str(dtype)[6:]}"
    f32 = dtype == torch.float32
    check(tag + " loss", loss, rloss, 1e-5 if f32 else 2e-3, 1e-6)
    for name, a, b in zip(("grad_hidden", "grad_weight", "grad_bias"), got, want):
        check(f"{tag} {name}", a, b, 1e-4 if f32 else 3e-2, 1e-5 if f32 else 2e-2)


def main() -> int:
    status = ops.available_backends()["cuda"]
    if status != "available":
        print(f"CUDA backend unavailable: {status}")
        return 2
    be = ops.get_backend("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons at full precision
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for dtype in (torch.float32, torch.bfloat16):
        for d in (13, 36, 40):  # scalar for all / scalar for bf16 / vector
            run_gather(be, d, dtype)
            run_unshuffle(be, d, dtype)
        for img_dtype in (torch.uint8, torch.float32):
            for norm_pix in (False, True):
                for p in (4, 16):  # runtime patch size / the compile-time p=16 path
                    run_mse(be, dtype, img_dtype, norm_pix, p)
        run_lce(be, 11, 24, 1001, dtype, chunk_bytes=4 * 1001 * 4)  # unaligned rows, several chunks
        run_lce(be, 5, 16, 7, dtype, chunk_bytes=1 << 20)  # vocabulary smaller than a vector
    from m3ae_engine import _C
    _C.synchronize(torch.cuda.current_device())  # surfaces any asynchronous fault as an exception
    torch.cuda.synchronize()
    if FAILURES:
        print(f"{len(FAILURES)} mismatches: {FAILURES}")
        return 1
    print("all CUDA kernels match their references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
