"""Compile the log-prob kernels ahead of time for a GPU target, on any machine (no GPU needed).

Run in a process where TRITON_INTERPRET is unset: `python tests/kernels/compile_for_gpu.py [arch]`.
It catches what the interpreter accepts but the compiler rejects (types, constexpr branches).
"""
from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megaflow.kernels import logprob_triton as kernels


def compile_kernel(fn: triton.runtime.JITFunction, dtype: str, flags: dict[str, object], arch: int) -> None:
    """Compile `fn` with every pointer argument of `dtype` (the coefficients float32) for sm_`arch`."""
    signature, constexprs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = flags[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("a_ptr", "b_ptr", "coef_ptr", "part_ptr", "out_ptr") else f"*{dtype}"
        else:
            signature[name] = "i32"
    options = {"num_warps": kernels.NUM_WARPS, "enable_fp_fusion": kernels.FP_FUSION}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{fn.__name__}: no cubin produced")


def main(arch: int = 90) -> None:
    """Every constexpr variant of the forward and backward kernels, float32 and bfloat16 inputs."""
    for dtype, ref, old in itertools.product(("fp32", "bf16"), (False, True), (False, True)):
        compile_kernel(kernels._partial_sums_kernel, dtype, {"HAS_REF": ref, "HAS_OLD": old, "OLD_SLOT": 1 + ref,
                                                             "BLOCK": kernels.BLOCK}, arch)
        compile_kernel(kernels._grad_v_kernel, dtype, {"USE_LP": not (ref and old), "USE_REF": ref, "USE_OLD": old,
                                                       "BLOCK": kernels.BLOCK}, arch)
    compile_kernel(kernels._reduce_rows_kernel, "fp32", {"REDUCE_BLOCK": kernels.REDUCE_BLOCK}, arch)
    print(f"compiled for sm_{arch}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
