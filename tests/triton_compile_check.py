"""Compile every Triton kernel of m3ae_engine.kernels for real GPU targets (sm_80, sm_90) on a machine
without a GPU: the interpreter accepts code the GPU compiler rejects (types, loop-carried values,
layouts), so CPU CI also checks the compiled path. Run as a script with TRITON_INTERPRET unset
(tests/test_triton_compile.py does this in a subprocess); exits non-zero listing the failures."""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import importlib  # noqa: E402

# the package re-exports functions under the module names: fetch the modules themselves
_common, gather, lce, masked_mse, unshuffle = (importlib.import_module(f"kernels.{m}") for m in (
    "_common", "gather", "masked_linear_cross_entropy", "masked_mse", "unshuffle"))

def cases(full: bool):
    floats = ("fp32", "bf16", "fp16") if full else ("bf16",)
    for dt, it in itertools.product(floats, ("i32", "i64") if full else ("i32",)):
        p = f"*{dt}"
        yield ("gather_rows", _common.gather_rows_kernel,
               dict(src_ptr=p, idx_ptr=f"*{it}", out_ptr=p, n_rows="i32", D="i32"), dict(BLOCK_R=4, BLOCK_D=1024))
        for has_cls in (True, False):
            yield ("gather_fwd", gather._gather_fwd_kernel,
                   dict(img_ptr=p, txt_ptr=p, cls_ptr=p, src_ptr=f"*{it}", out_ptr=p, T="i32", D="i32", n_img="i32",
                        n_txt="i32"), dict(HAS_CLS=has_cls, BLOCK_R=4, BLOCK_D=1024))
        yield ("cls_grad", gather._cls_grad_partial_kernel,
               dict(grad_ptr=p, src_ptr=f"*{it}", part_ptr="*fp32", T="i32", D="i32"),
               dict(ROWS_PER_PROG=32, BLOCK_R=4, BLOCK_D=1024))
        for has_type, has_pos in ((True, True), (False, False)):
            yield ("unshuffle_fwd", unshuffle._unshuffle_fwd_kernel,
                   dict(vis_ptr=p, mask_ptr=p, type_ptr=p, pos_ptr=p, rv_ptr=f"*{it}", rk_ptr=f"*{it}",
                        rp_ptr=f"*{it}", out_ptr=p, R="i32", D="i32"),
                   dict(HAS_TYPE=has_type, HAS_POS=has_pos, BLOCK_R=8, BLOCK_D=512))
        for nm, nt in ((True, True), (True, False), (False, True)):
            yield ("kind_grad", unshuffle._kind_grad_partial_kernel,
                   dict(grad_ptr=p, rv_ptr=f"*{it}", rk_ptr=f"*{it}", part_ptr="*fp32", R="i32", D="i32"),
                   dict(NEED_MASK=nm, NEED_TYPE=nt, ROWS_PER_PROG=64, BLOCK_R=8, BLOCK_D=512))
        for img, norm, bwd in itertools.product(("u8", "fp32"), (True, False), (True, False)):
            yield ("masked_mse", masked_mse._masked_mse_kernel,
                   dict(pred_ptr=p, img_ptr=f"*{img}", idx_ptr=f"*{it}", w_ptr="*fp32", stats_ptr="*fp32",
                        gin_ptr="*fp32", out_ptr=p if bwd else "*fp32", M="i32", C="i32", H="i32", W="i32", GW="i32",
                        L="i32", p="i32", P="i32"),
                   dict(IS_UINT8=img == "u8", NORM_PIX=norm, BACKWARD=bwd, BLOCK_R=4, BLOCK_P=1024))
        for wg, hb in itertools.product((True, False), (True, False)):
            yield ("ce_chunk", lce._ce_chunk_kernel,
                   dict(logits_ptr=p, bias_ptr="*fp32" if hb else p, tgt_ptr="*i64", w_ptr="*fp32", loss_ptr="*fp32",
                        correct_ptr="*fp32", n_rows="i32", V="i32", stride="i32"),
                   dict(HAS_BIAS=hb, WRITE_GRAD=wg, ROWS=1, BLOCK_V=4096))


def main():
    """--full: every dtype and index width for sm_80 and sm_90 (~1 min); default: bf16 / int32 variants
    of every kernel and flag combination for sm_90 (CI)."""
    full = "--full" in sys.argv
    failures, n = [], 0
    for cc in (80, 90) if full else (90,):
        for name, fn, sig, consts in cases(full):
            signature = dict(sig)
            signature.update({k: "constexpr" for k in consts})
            n += 1
            try:
                triton.compile(ASTSource(fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", cc, 32))
            except Exception as e:  # collect them all
                failures.append(f"sm_{cc} {name} {sig} {consts}: {type(e).__name__}: {str(e)[:400]}")
    for f in failures:
        print(f)
    print(f"compiled {n - len(failures)}/{n} kernel variants")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
