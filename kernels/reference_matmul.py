"""The matmul numerics every qpass linear shares: compute-dtype operands, float32 accumulation.

``linear_fp32_accumulate(x, w, bias, dtype)`` rounds ``x`` and ``w`` to ``dtype`` (the layer's compute
dtype), multiplies them with float32 accumulation, adds the bias in float32 and rounds the result to
``dtype`` once. That is what a bf16/fp16 tensor-core GEMM with a float32 accumulator computes, up to
summation order, and it is the contract faster kernels are tested against. It also keeps the
reference fast on CPUs without bf16 arithmetic.
"""

from __future__ import annotations

from typing import Protocol

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



# The blocked matmuls below decode about this many weights at a time: 1 MiB of float32, within a core's
# L2, so each block is multiplied while still in cache, and no weight-sized tensor is ever allocated.
BLOCK_WEIGHTS = 1 << 20


class RowDecoder(Protocol):
    """A quantized weight ``W [out_features, in_features]`` decoded a block of rows at a time:
    ``decoder(start, stop)`` gives rows ``[start, stop)`` as float32 values already rounded to the compute
    dtype (as ``w.to(dtype).float()``), possibly in a buffer that the next call overwrites. The blocked
    matmuls ask for ``row_step`` rows at a time, from row 0."""

    out_features: int
    in_features: int
    row_step: int

    def __call__(self, start: int, stop: int) -> torch.Tensor: ...


def row_blocks(decoder: RowDecoder):
    """``(start, stop, rows)`` for each block of ``decoder.row_step`` rows, from row 0."""
    for start in range(0, decoder.out_features, decoder.row_step):
        stop = min(start + decoder.row_step, decoder.out_features)
        yield start, stop, decoder(start, stop)


def linear_by_row_blocks(
    x: torch.Tensor, decoder: RowDecoder, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``linear_fp32_accumulate(x, W, bias, dtype)`` for a 2-D ``x``, with ``W`` never held whole. Each
    output is the same sum as there, over all of ``in_features`` in one matmul."""
    x32 = x.to(dtype).float()
    out_t = x32.new_empty(decoder.out_features, x32.shape[0])  # W @ x^T: each block of rows is contiguous
    for start, stop, rows in row_blocks(decoder):
        torch.mm(rows, x32.t(), out=out_t[start:stop])
    out = out_t.t()
    if bias is not None:
        out = out + bias.to(dtype).float()
    return out.to(dtype, memory_format=torch.contiguous_format)


def dequantize_by_row_blocks(decoder: RowDecoder, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``W`` in ``dtype``, ``[out_features, in_features]``: each block of rows decoded and written into the
    result while in cache, the copy rounding it to ``dtype`` (so give a decoder made for float32, which
    does not round its rows first). The result is the only weight-sized tensor allocated."""
    weight = torch.empty(decoder.out_features, decoder.in_features, dtype=dtype, device=device)
    for start, stop, rows in row_blocks(decoder):
        weight[start:stop].copy_(rows)
    return weight


def grad_input_by_row_blocks(grad_out: torch.Tensor, decoder: RowDecoder, dtype: torch.dtype) -> torch.Tensor:
    """``round_dtype(round_dtype(grad_out) @ W)`` for a 2-D ``grad_out``: float32 operands, a float32 sum
    over the blocks of rows, one rounding; ``W`` never held whole."""
    grad32 = grad_out.to(dtype).float()
    grad_x = grad32.new_zeros(grad32.shape[0], decoder.in_features)
    for start, stop, rows in row_blocks(decoder):
        grad_x.addmm_(grad32[:, start:stop], rows)
    return grad_x.to(dtype)
