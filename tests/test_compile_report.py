"""Every autotune config of the Triton kernels compiles for sm_90 (H100) without a GPU, with no
register spills and within an H100 block's shared memory, the 4-bit GEMM's SWAP_AB tiles keep
their tensor-core dots in flight across K steps (what they exist for), and the 4-bit GEMV looks up
each weight with one shuffle and no nibble mask. Triton and ptxas ship in the
triton wheel.

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


def test_every_config_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--arch", "90", "--json", str(out)],
                   env=env, check=True, cwd=tmp_path)
    rows = json.loads(out.read_text())
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
    # nibble is cut out by a bit-field extract (SHF + SGXT), and each weight costs one shuffle.
    for row in gemv:
        config = ast.literal_eval(row["kernel"].removeprefix("4bit gemv "))  # the config's kwargs as printed
        weights_per_thread = config["BLOCK_N"] * config["PARTS"] // row["num_warps"]
        assert "SGXT" not in row["main_loop_mix"], row
        assert weights_per_thread <= row["main_loop_mix"]["SHFL"] <= weights_per_thread + 2, row
