"""Compile every Triton kernel config for a GPU target without a GPU, and report its resources.

    python benchmarks/compile_report.py [--arch 90] [--match TEXT] [--no-fp-fusion]

Triton's compiler and ptxas ship in the triton wheel, so a CPU machine can compile the kernels for
sm_90 (H100/H200) and read registers per thread, spill stack and shared memory off the cubin
(``cuobjdump -res-usage``), and how its dots run off Triton's GPU IR (``tensor_cores``). A config that
spills or exceeds the 227 KiB of shared memory an H100 block may use is worth dropping before any GPU
time is spent on autotuning it.

Each kernel is compiled as a launch on a Llama-sized layer (28672 x 8192) would specialize it: every
pointer and every integer argument divisible by 16 is marked so, which decides how wide the loads
are. The report also counts the SASS instructions of the kernel's main loop per weight element it
handles per thread (``instr/weight``): a static cost that bounds how fast a memory-bound kernel can
go, since an SM sub-partition issues one warp instruction per cycle. At M=1 on an H100 (528
sub-partitions, ~1.75 GHz) a 28672 x 8192 layer takes ``instr/weight * 28672 * 8192 / (32 * 528) /
1.75e9`` s of issue alone, against ~40 us to read its 4-bit weights at 3 TB/s.
"""

from __future__ import annotations

import argparse
import collections
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


# Integer arguments of a launch on a 28672 x 8192 layer (M=16 for the GEMMs), for specialization.
LAYER_INTS = {"M": 16, "N": 28672, "K": 8192, "stride_xm": 8192, "stride_om": 28672, "M_BUCKET": 16,
              "BLOCKS_PER_SPLIT": 13, "K_PER_SPLIT": 2816}


def _divisibility(kernel, signature: dict[str, str]) -> dict:
    """The ``tt.divisibility`` attributes a runtime launch would give: pointers (torch allocations are
    16-byte aligned) and integers divisible by 16."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if signature[name].startswith("*") or (signature[name] == "i32" and LAYER_INTS.get(name, 1) % 16 == 0)}


def kernel_cases():
    """(name, kernel, signature, constexprs, num_warps, num_stages, weights per main-loop iteration)
    for every autotune config."""
    gemv_types = {**FOURBIT_POINTERS, "partial_ptr": _ptr("fp32"), "N": "i32", "K": "i32",
                  "BLOCKS_PER_SPLIT": "i32", "stride_xm": "i32"}
    gemv_consts = {name: FOURBIT_CONSTS[name] for name in ("BLOCKSIZE", "NESTED_BLOCKSIZE", "DOUBLE_QUANT")}
    for config in triton_4bit._gemv_configs():
        consts = {**gemv_consts, **config.kwargs}
        yield (f"4bit gemv {config.kwargs}", triton_4bit._gemv_kernel, _signature(triton_4bit._gemv_kernel, gemv_types),
               consts, config.num_warps, config.num_stages, config.kwargs["BLOCK_N"] * config.kwargs["PARTS"] * 32)
    gemm_types = {**FOURBIT_POINTERS, "bias_ptr": _ptr("bf16"), "out_ptr": _ptr("bf16"),
                  "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "M_BUCKET": "i32",
                  "K_PER_SPLIT": "i32"}
    for config in triton_4bit._gemm_configs():
        consts = {**FOURBIT_CONSTS, "HAS_BIAS": True, "IEEE_DOT": False, **config.kwargs}
        yield (f"4bit gemm {config.kwargs}", triton_4bit._gemm_kernel, _signature(triton_4bit._gemm_kernel, gemm_types),
               consts, config.num_warps, config.num_stages, config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"])
    dequant_types = {**FOURBIT_POINTERS, "out_ptr": _ptr("bf16"), "N": "i32", "K": "i32"}
    config = triton_4bit.DEQUANT_CONFIG
    yield (f"4bit dequant {config.kwargs}", triton_4bit._dequant_kernel,
           _signature(triton_4bit._dequant_kernel, dequant_types), {**FOURBIT_CONSTS, **config.kwargs},
           config.num_warps, config.num_stages, config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"])
    int8_types = {"ca_ptr": _ptr("i8"), "cb_ptr": _ptr("i8"), "product_ptr": _ptr("i32"), "sca_ptr": _ptr("fp32"),
                  "scb_ptr": _ptr("fp32"), "x_ptr": _ptr("bf16"), "columns_ptr": _ptr("i32"), "count_ptr": _ptr("i32"),
                  "bias_ptr": _ptr("bf16"), "out_ptr": _ptr("bf16"), "M": "i32", "N": "i32", "K": "i32",
                  "stride_xm": "i32", "stride_om": "i32", "M_BUCKET": "i32", "K_PER_SPLIT": "i32"}
    int8_consts = {"HAS_OUTLIERS": True, "HAS_BIAS": True, "IEEE_DOT": False,
                   "scale_product": triton_int8.INT8_SCALE_PRODUCT, "dequant": triton_int8.INT8_DEQUANT}
    int8_signature = _signature(triton_int8._int8_gemm_kernel, int8_types)
    for config in triton_int8._gemm_configs():
        yield (f"int8 gemm {config.kwargs}", triton_int8._int8_gemm_kernel, int8_signature,
               {**int8_consts, "PRODUCT_GIVEN": False, **config.kwargs}, config.num_warps, config.num_stages,
               config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"])
    config = triton_int8.EPILOGUE_CONFIG  # its only loop gathers outlier columns: instr/weight means little here
    yield (f"int8 epilogue {config.kwargs}", triton_int8._int8_gemm_kernel, int8_signature,
           {**int8_consts, "PRODUCT_GIVEN": True, **config.kwargs}, config.num_warps, config.num_stages,
           config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"])


def compile_case(kernel, signature, constexprs, num_warps, num_stages, arch: int, weights_per_iteration: int,
                 fp_fusion: bool | None = None) -> dict:
    """``fp_fusion``: whether the compiler may contract a product and a following add into one FMA;
    None for Triton's default (on up to 3.9; 3.10 turns it off)."""
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=_divisibility(kernel, signature))
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if fp_fusion is not None:
        options["enable_fp_fusion"] = fp_fusion
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = _cuobjdump("-res-usage", cubin.name)
        sass = _cuobjdump("-sass", cubin.name)
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    loop = main_loop(sass)
    return {"registers": int(match.group(1)), "spill_stack_bytes": int(match.group(2)),
            "shared_bytes": compiled.metadata.shared,
            "tensor_cores": tensor_cores(compiled.asm["ttgir"]),
            "main_loop_instructions": len(loop),
            "instructions_per_weight": len(loop) * 32 * num_warps / weights_per_iteration,
            "main_loop_mix": dict(collections.Counter(_opcode(line) for line in loop).most_common())}


def tensor_cores(ttgir: str) -> str:
    """How a kernel's dots run, from its Triton GPU IR: "wgmma async" (Hopper's warp-group MMA, left
    in flight across loop steps: some wait allows pending dots), "wgmma waited" (every dot waited for
    at once), "mma.sync" (the pre-Hopper warp MMA) or "none"."""
    if "ttng.warp_group_dot " in ttgir:
        pending = [int(n) for n in re.findall(r"warp_group_dot_wait.*?pendings = (\d+)", ttgir)]
        return "wgmma async" if any(pending) else "wgmma waited"
    return "mma.sync" if "tt.dot " in ttgir else "none"


def _cuobjdump(flag: str, path: str) -> str:
    return subprocess.run([str(BIN / "cuobjdump"), flag, path], capture_output=True, text=True, check=True).stdout


def _opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def main_loop(sass: str) -> list[str]:
    """The instructions of the kernel's first loop (a backward branch's span) in a SASS listing: the
    K loop of every kernel here (the int8 GEMM's second loop, over outlier columns, is short or empty); the
    whole kernel when it has no loop."""
    instruction = r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;"  # /*0a30*/ OPCODE operands ;
    instructions = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(instruction, sass)]
    loops = []
    for address, text in instructions:
        target = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
        if target and target.group(1) and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    if not loops:  # one tile per program: the whole kernel
        return [t for _, t in instructions]
    start, end = min(loops)
    return [t for a, t in instructions if start <= a <= end]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--match", action="append",
                        help="compile only the configs whose printed name contains this text (repeatable)")
    parser.add_argument("--no-fp-fusion", action="store_true",
                        help="forbid contracting products into FMAs, as Triton 3.10 will by default")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = []
    for name, kernel, signature, constexprs, warps, stages, weights in kernel_cases():
        if args.match and not any(text in name for text in args.match):
            continue
        row = {"kernel": name, "num_warps": warps, "num_stages": stages,
               **compile_case(kernel, signature, constexprs, warps, stages, args.arch, weights,
                              fp_fusion=False if args.no_fp_fusion else None)}
        flags = []
        if row["spill_stack_bytes"]:
            flags.append("SPILLS")
        if row["shared_bytes"] > H100_MAX_SHARED:
            flags.append("TOO MUCH SHARED MEMORY")
        print(f"{name:<70} warps={warps} stages={stages} regs={row['registers']:>3} "
              f"spill={row['spill_stack_bytes']:>5} shared={row['shared_bytes'] / 1024:6.1f} KiB "
              f"mma={row['tensor_cores']:<12} "
              f"instr/weight={row['instructions_per_weight']:5.2f} "
              f"{' '.join(flags)}", flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
