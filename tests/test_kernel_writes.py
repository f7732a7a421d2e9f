"""Inductor sees exactly which tensors each qpass Triton kernel writes: its outputs, never the weights
or x. torch.compile decides this from the kernel's TTIR; where it cannot analyse an op (inline PTX not
marked pure, for one), it assumes the kernel writes every tensor it takes, and then copies them all
before each launch and writes them back as mutations of the op's inputs (the quantized weights
included). The analysis needs a compile target and no GPU (tests/kernel_writes.py); it runs in a
subprocess because the test session may have TRITON_INTERPRET=1 set, under which kernels are not
compiled."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WRITES = {
    "_gemv_kernel": ["partial_ptr"],
    "_gemm_kernel": ["out_ptr"],
    "_dequant_kernel": ["out_ptr"],
    "_outlier_columns_kernel": ["mask_ptr"],
    "_int8_gemm_kernel": ["out_ptr"],
}
# The row-quantization kernel writes the outlier mask itself for a single row (no column-scan kernel).
QUANTIZE_ROWS_WRITES = [["ca_ptr", "columns_ptr", "count_ptr", "sca_ptr"],
                        ["ca_ptr", "columns_ptr", "count_ptr", "mask_ptr", "sca_ptr"]]


def test_inductor_finds_each_kernel_writes_its_outputs_only():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(HERE / "kernel_writes.py")], env=env, capture_output=True, text=True,
                            cwd=HERE)
    assert result.returncode == 0, result.stderr
    # Inductor logs a warning when its analysis fails, and then reports every tensor as written.
    assert "assuming every input is mutated" not in result.stderr, result.stderr
    rows = json.loads(result.stdout)
    assert {row["kernel"] for row in rows} == {*WRITES, "_quantize_rows_kernel"}
    for row in rows:
        expected = WRITES.get(row["kernel"])
        if expected is None:
            assert row["writes"] in QUANTIZE_ROWS_WRITES, row
        else:
            assert row["writes"] == expected, row
        assert len(row["writes"]) < len(row["tensors"]), row
