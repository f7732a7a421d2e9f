"""The matmul numerics every qpass linear shares: compute-dtype operands, float32 accumulation.

``linear_fp32_accumulate(x, w, bias, dtype)`` rounds ``x`` and ``w`` to ``dtype`` (the layer's compute
dtype), multiplies them with float32 accumulation, adds the bias in float32 and rounds the result to
``dtype`` once. That is what a bf16/fp16 tensor-core GEMM with a float32 accumulator computes, up to
summation order, and it is the contract faster kernels are tested against. It also keeps the
reference fast on CPUs without bf16 arithmetic.
"""

from __future__ import annotations

import torch


def linear_fp32_accumulate(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """``round_dtype(x' @ w'^T + bias + extra)`` with ``x' = round_dtype(x)``, ``w' = round_dtype(weight)``.

    ``extra`` is an optional float32 term of the output's shape added before the single rounding.
    """
    x32 = x.to(dtype).float()
    w32 = weight.to(dtype).float()
    out = torch.nn.functional.linear(x32, w32, None if bias is None else bias.to(dtype).float())
    if extra is not None:
        out = out + extra
    return out.to(dtype)
