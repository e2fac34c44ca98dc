"""Compile capkit's Triton kernels ahead of time for NVIDIA GPUs, on a machine without one.

The interpreter (how the kernels are tested on CPUs) checks what they compute, not whether they
compile for a GPU: tl.dot shapes and dtypes, layouts, register and shared-memory limits only show
in the real compiler. This script compiles every kernel for sm_80 and sm_90 with Triton's own
ptxas, in the variants that differ in generated code (element and mask dtypes, dense or block
layouts, exact or tf32 fp32 dots, both InfoNCE passes), each with the largest tile its autotune
prune keeps for that GPU, and checks that the shared memory it uses fits the GPU.

    python tests/triton_aot.py [ARCH ...]      # prints one JSON line per kernel, exit 1 on a failure

Run by tests/test_triton_compile.py in a process of its own: TRITON_INTERPRET must be unset.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from capkit.kernels import _common  # noqa: E402
from capkit.kernels import info_nce as nce  # noqa: E402
from capkit.kernels import masked_linear as ml  # noqa: E402
from capkit.kernels import topk_select as ts  # noqa: E402

# shared memory one block may opt in to (bytes): A100, H100
SMEM_OPTIN = {80: 166912, 90: 232448}
MASK_DTYPES = {"*u8": torch.uint8, "*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32}


def compile_kernel(kernel, types: dict, consts: dict, config: triton.Config, arch: int) -> dict:
    """Compile ``kernel`` (a JIT function or an autotuned one) with ``consts`` and ``config``."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    consts = {**consts, **config.kwargs}
    missing = [n for n in fn.arg_names if n not in consts and n not in types]
    if missing:
        raise KeyError(f"{fn.__name__}: no type for argument(s) {missing}")
    signature = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    src = ASTSource(fn, signature, constexprs={n: consts[n] for n in fn.arg_names if n in consts})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return {"shared": int(compiled.metadata.shared)}


def masked_linear_cases():
    # (element dtype, mask kind and dtype, block size or 0, fp32 dot precision)
    variants = [("fp16", 1, "*u8", 0, "ieee"), ("bf16", 2, "*bf16", 32, "ieee"),
                ("fp32", 0, "*fp32", 0, "ieee"), ("fp32", 2, "*fp32", 128, "tf32")]
    kernels = [("fwd", ml._fwd_kernel, ml._MM_CONFIGS), ("dx", ml._grad_input_kernel, ml._MM_CONFIGS),
               ("gw", ml._grad_weight_kernel, ml._GW_CONFIGS)]
    for name, kernel, configs in kernels:
        for dtype, mask_kind, mask_type, block, precision in variants:
            p = "*" + dtype
            elem = 4 if dtype == "fp32" else 2
            consts = dict(ELEM_BYTES=elem, BLOCK_SIZE=block, HAS_LAYOUT=block > 0, MASK_KIND=mask_kind,
                          DOT_PRECISION=precision if dtype == "fp32" else "ieee", HAS_BIAS=True,
                          COMPUTE_DEAD=mask_kind == 2 or block == 0, SEARCH_ITERS=4, NEED_DW=True,
                          NEED_DM=mask_kind == 2)
            types = dict(x_ptr=p, w_ptr=p, g_ptr=p, bias_ptr=p, y_ptr=p, dx_ptr=p, dw_ptr=p,
                         mask_ptr=mask_type if mask_kind else p, dm_ptr=mask_type if mask_kind else p,
                         row_ptr="*i32", col_idx="*i32", col_ptr="*i32", row_idx="*i32",
                         M="i32", N="i32", K="i32", M_BUCKET="i32", stride_xm="i32", stride_wn="i32",
                         stride_ym="i32", stride_gm="i32", stride_dxm="i32")
            mask = torch.empty(1, dtype=MASK_DTYPES[mask_type])  # the prune reads its element size
            args = dict(BLOCK_SIZE=block, HAS_LAYOUT=block > 0, ELEM_BYTES=elem, MASK_KIND=mask_kind,
                        mask_ptr=mask)
            yield (f"masked_linear.{name} {dtype} mask {mask_kind} block {block} {consts['DOT_PRECISION']}",
                   kernel, types, consts, ml._make_prune(name, ("BLOCK_N", "BLOCK_K"))(configs, args))


def info_nce_cases():
    for backward, kernel, configs in ((False, nce._fwd_kernel, nce._FWD_CONFIGS),
                                      (True, nce._bwd_kernel, nce._BWD_CONFIGS)):
        for key_dtype, key_bytes, parts in (("fp32", 4, 0), ("fp16", 2, 2), ("bf16", 2, 3)):
            consts = dict(HAS_SCALE=True, HAS_LAB=True, HAS_SELF=True, N_PARTS=parts, KEY_BYTES=key_bytes,
                          DOT_PRECISION="tf32x3", FUSED_REDUCE=True, G_LIMIT=16384.0 if key_dtype == "fp16" else 0.0)
            types = dict(q_ptr="*fp32" if parts == 0 else "*" + key_dtype, qmul_ptr="*fp32", k_ptr="*" + key_dtype,
                         ks_ptr="*fp32", qid_ptr="*i64", kid_ptr="*i64", qlab_ptr="*i64", klab_ptr="*i64",
                         self_ptr="*i64", lse_ptr="*fp32", coef_ptr="*fp32", out_ptr="*fp32", B="i32", M="i32",
                         D="i32", PART_STRIDE="i32", SPLITS="i32", B_BUCKET="i32", M_BUCKET="i32")
            # CAP's shape: 32 queries, 4,200 keys, 768 dims
            kept = nce._make_prune(backward)(configs, {"B_BUCKET": 32, "M_BUCKET": 8192, "D": 768},
                                             KEY_BYTES=key_bytes, N_PARTS=parts)
            yield (f"info_nce.{'bwd' if backward else 'fwd'} keys {key_dtype}", kernel, types, consts, kept)


def topk_cases():
    import triton.language as tl

    types = dict(ptr_table="*i64", numel_table="*i64", row_table="*i32", prefix_ptr="*i32", hist_ptr="*i32",
                 nan_ptr="*i32", k_ptr="*i32", out_ptr="*fp32")
    one = [triton.Config({}, num_warps=8, num_stages=3)]
    for name, dtype in (("fp32", tl.float32), ("fp16", tl.float16), ("bf16", tl.bfloat16)):
        consts = dict(DTYPE=dtype, SHIFT=24, FIRST=True, NUM_BINS=256, HIGH=32, BLOCK=2048, ITERS=4)
        yield f"topk.histogram {name}", ts._histogram_kernel, types, consts, one
    yield "topk.select", ts._select_kernel, types, dict(SHIFT=0, LAST=True, NUM_BINS=256), one


def main(archs) -> int:
    failures = 0
    for arch in archs:
        budget = min(_common.SMEM_BUDGET, SMEM_OPTIN[arch] * 7 // 8)
        _common.smem_budget = lambda device=None, _b=budget: _b  # the prunes fit this GPU
        for cases in (masked_linear_cases, info_nce_cases, topk_cases):
            for label, kernel, types, consts, configs in cases():
                config = configs[0]  # the largest tile the prune keeps
                row = {"arch": arch, "kernel": label, "config": config.kwargs, "warps": config.num_warps,
                       "stages": config.num_stages}
                try:
                    row.update(compile_kernel(kernel, types, consts, config, arch))
                    row["ok"] = row["shared"] <= SMEM_OPTIN[arch]
                except Exception as exc:  # reported, and the run fails
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
                failures += not row["ok"]
                print(json.dumps(row), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or sorted(SMEM_OPTIN)))
