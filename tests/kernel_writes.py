"""Prints, as JSON, what Inductor's analysis finds each qpass Triton kernel writes, for every kernel the
two linear ops launch (4-bit at M = 1, 16 and DEQUANT_MATMUL_MIN_M; int8 at M = 1, 16 and from
INT_MM_MIN_M). Run by tests/test_kernel_writes.py, in a process without TRITON_INTERPRET; other tests
import ``recorded_launches`` to see what the host code hands the kernels.

Under torch.compile, Inductor reads each user Triton kernel's TTIR to find the tensor arguments it
writes (``torch._higher_order_ops.triton_kernel_wrap``). The analysis needs no GPU, only a compile
target, so this script makes sm_90 Triton's active target; launches are recorded, not run."""

from __future__ import annotations

import json

import torch
import triton
import torch._higher_order_ops.triton_kernel_wrap as triton_kernel_wrap
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

import qpass
from qpass.formats import quantize_weight
from qpass.kernels import triton_4bit, triton_int8


class Sm90Target:
    """Stands in for the CUDA driver: Triton asks its active driver only for the compile target here."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def recorded_launches(launches: list):
    """A ``launch`` wrapper for the kernels' host functions that records ``(kernel, arguments by name)``."""
    def launch(kernel):
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel

        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, {**dict(zip(fn.arg_names, args)), **kwargs}))
        return Grid()
    return launch


def written_arguments(kernel, arguments: dict) -> list[str]:
    """The arguments Inductor's analysis says ``kernel`` writes (every tensor argument where it cannot
    analyse the kernel). torch 2.11 names it identify_mutated_tensors, later ones identify_accessed_tensors."""
    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, dict(arguments), {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    return sorted(triton_kernel_wrap.identify_mutated_tensors(kernel, dict(arguments), {}))


def main() -> None:
    driver.set_active(Sm90Target())
    launches: list = []
    launch = recorded_launches(launches)
    n, k = 256, 512
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.NF4Config(compute_dtype=torch.bfloat16))
    for m in (1, 16, triton_4bit.DEQUANT_MATMUL_MIN_M):
        triton_4bit.linear_4bit_triton(
            torch.randn(m, k, dtype=torch.bfloat16), t["weight"], t["quant_map"], t["absmax"], t["nested_absmax"],
            t["nested_quant_map"], t["offset"], None, n, k, layout.config.blocksize, torch.bfloat16, launch=launch)
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.Int8Config(compute_dtype=torch.bfloat16))
    for m in (1, 16, max(triton_int8.INT_MM_MIN_M, 17)):
        triton_int8.linear_int8_triton(torch.randn(m, k, dtype=torch.bfloat16), t["weight"], t["SCB"], None, 6.0,
                                       torch.bfloat16, launch=launch)
    rows = []
    for kernel, arguments in launches:
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        rows.append({"kernel": fn.__name__, "writes": written_arguments(kernel, arguments),
                     "tensors": sorted(name for name, value in arguments.items() if isinstance(value, torch.Tensor))})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
