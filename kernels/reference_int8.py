"""Plain-torch reference kernels of LLM.int8() (bitsandbytes ``Linear8bitLt``) with outlier decomposition.

Weight ``W [out, in]``: ``SCB = max_k |W[o, k]|`` (float32 ``[out]``) and ``CB = round(W * 127 / SCB)``
(int8 ``[out, in]``, round half to even), computed from ``W`` cast to float16 as bitsandbytes does.

Activations ``X [m, in]`` with threshold t > 0: column k is an *outlier column* when any
``|X[:, k]| >= t``. ``SCA = max |X[i, k]|`` over the entries below t; ``CA = round(X * 127 / SCA)`` with
outlier columns zeroed. Output, all in static shapes (the outlier columns are a boolean mask over
``in``, never a gathered list, so no host sync and no data-dependent shape):

    Y = (CA @ CB^T) * (SCA ⊗ SCB) / 127²                 (int32 accumulation, float32 epilogue)
      + (X * mask) @ (CB * SCB / 127)^T                   (outlier columns: compute-dtype operands)
      + bias                                              (all summed in float32, rounded once)
"""

from __future__ import annotations

import torch

from .reference_matmul import BLOCK_WEIGHTS, linear_fp32_accumulate, row_blocks

INT8_SCALE_PRODUCT = 6.200124e-05  # 1/127² as bitsandbytes writes it (int8_mm_dequant)
INT8_DEQUANT = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it (int8_vectorwise_dequant)
_EXACT_K = 1024  # 1024 * 127 * 127 < 2**24: an fp32 dot of this many int8 products is exact


def int8_vectorwise_quant(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise int8 quantization of a 2-D float tensor; returns (int8 ``[m, k]``, float32 ``[m]``,
    bool outlier-column mask ``[k]``). With ``threshold <= 0`` the mask is all False."""
    xf = x.float()
    magnitude = xf.abs()
    if threshold > 0:
        outlier = magnitude >= threshold
        columns = outlier.any(dim=0)
        magnitude = magnitude.masked_fill(outlier, 0.0)
    else:
        columns = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    row_absmax = magnitude.amax(dim=-1) if x.shape[-1] else magnitude.new_zeros(x.shape[0])
    # A zero row quantizes to zeros (bitsandbytes would divide 0 by 0 here).
    scale = 127.0 / torch.where(row_absmax > 0, row_absmax, torch.ones_like(row_absmax))
    quantized = torch.round(xf * scale.unsqueeze(-1))
    quantized = quantized.masked_fill(columns.unsqueeze(0), 0.0)
    return quantized.to(torch.int8), row_absmax, columns


def dequantize_int8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``CB * SCB / 127`` in float32, cast to ``dtype``."""
    return (cb.float() * scb.float().unsqueeze(-1) * INT8_DEQUANT).to(dtype)


class RowDecoderInt8:
    """An int8 weight decoded a block of rows at a time, for the blocked matmuls of ``reference_matmul``
    (a ``RowDecoder``): rows ``[start, stop)`` as float32 ``[stop - start, in_features]``, into one buffer
    allocated once and overwritten by the next call.

    With ``scb``, the rows of ``dequantize_int8(cb, scb, dtype)`` as float32 (bit for bit); with
    ``scb=None``, the codes ``CB`` themselves (exact in float32). ``row_step`` rows hold about
    ``block_weights`` weights."""

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor | None, dtype: torch.dtype, block_weights: int):
        self.out_features, self.in_features = cb.shape
        self.row_step = max(1, min(self.out_features, block_weights // max(self.in_features, 1)))
        self._cb = cb
        self._scales = None if scb is None else scb.float().unsqueeze(-1)
        self._values = torch.empty(self.row_step, self.in_features, dtype=torch.float32, device=cb.device)
        self._rounded = None if dtype == torch.float32 or scb is None else torch.empty_like(self._values, dtype=dtype)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        values = self._values[: stop - start]
        values.copy_(self._cb[start:stop])
        if self._scales is not None:  # dequantize_int8's arithmetic: (CB * SCB) * (1 / 127), then rounded
            values.mul_(self._scales[start:stop]).mul_(INT8_DEQUANT)
            if self._rounded is not None:
                values.copy_(self._rounded[: stop - start].copy_(values))
        return values


def int8_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int32 ``a @ b^T`` of int8 ``[m, k]`` and ``[n, k]`` on any device, exactly.

    Multiplies float32 codes, ``b`` a block of rows at a time (``RowDecoderInt8``; ``b`` is never
    converted whole), summing over chunks of ``_EXACT_K`` along k, each exact, and adding the chunks in
    int32. On the CPU a block holds about ``BLOCK_WEIGHTS`` codes, so it is multiplied while in cache; on
    other devices (a GPU without the Triton kernels) as many as ``_EXACT_K`` columns of every row, so
    that the launches stay few.
    """
    a32 = a.float()
    out_t = torch.zeros(b.shape[0], a.shape[0], dtype=torch.int32, device=a.device)  # b @ a^T, row blocks contiguous
    block_weights = BLOCK_WEIGHTS if b.device.type == "cpu" else b.shape[0] * _EXACT_K
    for start, stop, rows in row_blocks(RowDecoderInt8(b, None, torch.float32, block_weights)):
        for first in range(0, a.shape[1], _EXACT_K):
            chunk = torch.mm(rows[:, first : first + _EXACT_K], a32[:, first : first + _EXACT_K].t())
            out_t[start:stop] += chunk.to(torch.int32)
    return out_t.t().contiguous()


def linear_int8(
    x: torch.Tensor,
    cb: torch.Tensor,
    scb: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    compute_dtype: torch.dtype,
    gather_outliers: bool = False,
) -> torch.Tensor:
    """LLM.int8() linear of a 2-D ``x``; the result is in ``compute_dtype``.

    Both terms are summed in float32 with the bias and rounded once (bitsandbytes rounds the int8 term
    to the compute dtype before adding the outlier term; this is at least as accurate).

    ``gather_outliers`` computes the outlier term from the outlier columns alone (``x[:, cols]`` and
    ``CB[:, cols]`` dequantized) instead of masking ``x`` and dequantizing all of ``CB``: the same
    products, summed in another order, but a data-dependent shape and a host sync, so only for the CPU,
    where it is 2-7x faster, and inside an op tracing does not enter (``ops.linear_int8_cpu``).
    """
    x = x.to(compute_dtype)
    ca, sca, outlier_columns = int8_vectorwise_quant(x, threshold)
    acc = int8_matmul_exact(ca, cb)
    int8_term = acc.float() * (sca.unsqueeze(-1) * scb.float().unsqueeze(0)) * INT8_SCALE_PRODUCT
    if threshold <= 0:
        if bias is not None:
            int8_term = int8_term + bias.to(compute_dtype).float()
        return int8_term.to(compute_dtype)
    if gather_outliers:
        columns = outlier_columns.nonzero().squeeze(1)
        x_outliers, cb_outliers = x.index_select(1, columns), cb.index_select(1, columns)
    else:
        x_outliers, cb_outliers = x * outlier_columns.to(compute_dtype), cb
    return linear_fp32_accumulate(x_outliers, dequantize_int8(cb_outliers, scb, compute_dtype), bias, compute_dtype,
                                  extra=int8_term)
