"""Every autotune config of the Triton kernels compiles for sm_90 (H100) without a GPU, with no
register spills and within an H100 block's shared memory, the 4-bit GEMM's SWAP_AB tiles keep
their tensor-core dots in flight across K steps (what they exist for), and the 4-bit GEMV looks up
each weight with one shuffle and no nibble mask, and the main loops compile the same whether or not
Triton may contract multiplies and adds. Triton and ptxas ship in the triton wheel.

Runs in a subprocess: the test session may have TRITON_INTERPRET=1 set, and interpreted kernels
cannot be compiled."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_MAX_SHARED = 227 * 1024


def _report(tmp_path, name: str, *arguments: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / name
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--arch", "90", "--json", str(out),
                    *arguments], env=env, check=True, cwd=tmp_path)
    return json.loads(out.read_text())


def test_every_config_compiles_for_sm90_without_spills(tmp_path):
    rows = _report(tmp_path, "report.json")
    kinds = {row["kernel"].split(" {")[0] for row in rows}
    assert kinds == {"4bit gemv", "4bit gemm", "4bit dequant", "int8 gemm", "int8 epilogue"}
    for row in rows:
        assert row["spill_stack_bytes"] == 0, row
        assert row["shared_bytes"] <= H100_MAX_SHARED, row
    swapped = [row for row in rows if "'SWAP_AB': True" in row["kernel"]]
    assert swapped and all(row["tensor_cores"] == "wgmma async" for row in swapped), swapped
    gemv = [row for row in rows if row["kernel"].startswith("4bit gemv")]
    assert {row["tensor_cores"] for row in gemv} == {"none"}
    # The GEMV's code-book lookup is a shuffle that ignores the bits above the nibble (_shuffle_code): no
    # nibble is cut out by a bit-field extract (SHF + SGXT; Triton 3.9 puts one SGXT in the 2-warp
    # config's address arithmetic, against 64 weights per thread), and each weight costs one shuffle.
    for row in gemv:
        config = ast.literal_eval(row["kernel"].removeprefix("4bit gemv "))  # the config's kwargs as printed
        weights_per_thread = config["BLOCK_N"] * config["PARTS"] // row["num_warps"]
        assert row["main_loop_mix"].get("SGXT", 0) <= 1, row
        assert weights_per_thread <= row["main_loop_mix"]["SHFL"] <= weights_per_thread + 2, row


def test_main_loops_do_not_depend_on_fp_contraction(tmp_path):
    """The CUDA-core sums (the GEMV's code x x products, the short GEMM tiles' per-step scaling) are
    written as tl.fma, so they compile to one FFMA per product whether or not the compiler may contract
    a multiply and an add: Triton up to 3.9 contracts by default, 3.10 will not. With `a * b + c` the
    GEMV's main loop would turn each FFMA into FMUL + FADD, about one instruction per weight more."""
    matches = ["--match", "4bit gemv {'BLOCK_N': 16, 'PARTS': 8, 'LOAD_STAGES': 0}",
               "--match", "4bit gemm {'BLOCK_M': 16, 'BLOCK_N': 32, 'BLOCK_K': 64, 'LOAD_STAGES': 0"]
    default = _report(tmp_path, "default.json", *matches)
    uncontracted = _report(tmp_path, "uncontracted.json", *matches, "--no-fp-fusion")
    assert [row["kernel"] for row in default] == [row["kernel"] for row in uncontracted] and len(default) == 2
    for fused, plain in zip(default, uncontracted):
        assert plain["main_loop_mix"] == fused["main_loop_mix"], (fused["kernel"], fused["main_loop_mix"],
                                                                  plain["main_loop_mix"])
        assert plain["main_loop_mix"]["FFMA"] > 0
