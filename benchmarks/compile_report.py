"""Compile every Triton kernel config for a GPU target without a GPU, and report its resources.

    python benchmarks/compile_report.py [--arch 90]

Triton's compiler and ptxas ship in the triton wheel, so a CPU machine can compile the kernels for
sm_90 (H100/H200) and read registers per thread, spill stack and shared memory off the cubin
(``cuobjdump -res-usage``). A config that spills or exceeds the 227 KiB of shared memory an H100 block
may use is worth dropping before any GPU time is spent on autotuning it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qpass.kernels import triton_4bit, triton_int8

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
H100_MAX_SHARED = 227 * 1024


def _ptr(t: str) -> str:
    return "*" + t


FOURBIT_POINTERS = {
    "x_ptr": _ptr("bf16"), "packed_ptr": _ptr("u8"), "code_ptr": _ptr("fp32"), "absmax_ptr": _ptr("u8"),
    "nested_absmax_ptr": _ptr("fp32"), "nested_code_ptr": _ptr("fp32"), "offset_ptr": _ptr("fp32"),
}
FOURBIT_CONSTS = {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": True, "ROW_ALIGNED": True}


def _signature(kernel, types: dict[str, str]) -> dict[str, str]:
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


def kernel_cases():
    """(name, kernel, signature, constexprs, num_warps, num_stages) for every autotune config."""
    gemv_types = {**FOURBIT_POINTERS, "partial_ptr": _ptr("fp32"), "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32"}
    for config in triton_4bit._gemv_configs():
        consts = {**FOURBIT_CONSTS, **config.kwargs}
        yield (f"4bit gemv {config.kwargs}", triton_4bit._gemv_kernel, _signature(triton_4bit._gemv_kernel, gemv_types),
               consts, config.num_warps, config.num_stages)
    gemm_types = {**FOURBIT_POINTERS, "bias_ptr": _ptr("bf16"), "out_ptr": _ptr("bf16"), "M": "i32", "N": "i32", "K": "i32",
                  "stride_xm": "i32", "stride_om": "i32", "M_BUCKET": "i32"}
    for config in triton_4bit._gemm_configs():
        consts = {**FOURBIT_CONSTS, "HAS_BIAS": True, "IEEE_DOT": False, **config.kwargs}
        yield (f"4bit gemm {config.kwargs}", triton_4bit._gemm_kernel, _signature(triton_4bit._gemm_kernel, gemm_types),
               consts, config.num_warps, config.num_stages)
    int8_types = {"ca_ptr": _ptr("i8"), "cb_ptr": _ptr("i8"), "sca_ptr": _ptr("fp32"), "scb_ptr": _ptr("fp32"), "x_ptr": _ptr("bf16"),
                  "mask_ptr": _ptr("i32"), "bias_ptr": _ptr("bf16"), "out_ptr": _ptr("bf16"), "M": "i32", "N": "i32", "K": "i32",
                  "stride_xm": "i32", "stride_om": "i32", "M_BUCKET": "i32", "scale_product": "fp32", "dequant": "fp32"}
    for config in triton_int8._gemm_configs():
        consts = {"HAS_OUTLIERS": True, "HAS_BIAS": True, "IEEE_DOT": False, **config.kwargs}
        yield (f"int8 gemm {config.kwargs}", triton_int8._int8_gemm_kernel, _signature(triton_int8._int8_gemm_kernel, int8_types),
               consts, config.num_warps, config.num_stages)


def compile_case(kernel, signature, constexprs, num_warps, num_stages, arch: int) -> dict:
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"registers": int(match.group(1)), "spill_stack_bytes": int(match.group(2)), "shared_bytes": compiled.metadata.shared}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = []
    for name, kernel, signature, constexprs, warps, stages in kernel_cases():
        row = {"kernel": name, "num_warps": warps, "num_stages": stages,
               **compile_case(kernel, signature, constexprs, warps, stages, args.arch)}
        flags = []
        if row["spill_stack_bytes"]:
            flags.append("SPILLS")
        if row["shared_bytes"] > H100_MAX_SHARED:
            flags.append("TOO MUCH SHARED MEMORY")
        print(f"{name:<70} warps={warps} regs={row['registers']:>3} spill={row['spill_stack_bytes']:>5} "
              f"shared={row['shared_bytes'] / 1024:6.1f} KiB {' '.join(flags)}", flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
