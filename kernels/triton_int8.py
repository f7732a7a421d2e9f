"""Triton kernels of LLM.int8() with outlier decomposition (see ``reference_int8`` for the math).

Three launches (two at M = 1, where the row kernel also writes the mask), all with static shapes and
no host synchronization, so CUDA graphs capture them:

1. ``_outlier_columns_kernel``: ``mask[k] = any_m |x[m, k]| >= threshold`` (int32, atomic max).
2. ``_quantize_rows_kernel``: one program per row: ``SCA[m] = max |x[m, k]|`` over entries below the
   threshold, ``CA[m, k] = round(x * 127 / SCA)`` (half to even) with outlier columns zeroed. Program 0
   also compacts the mask: the outlier column indices in increasing order at the front of an int32
   ``[k]`` list, and their count (an int32 on the device: the shapes stay static).
3. ``_int8_gemm_kernel``: ``CA @ CB^T`` on int8 tensor cores into int32, scaled once by
   ``SCA[m] * SCB[n] / 127²`` into float32; then the outlier columns, OUTLIER_BLOCK at a time from the
   compacted list (a loop of count / OUTLIER_BLOCK steps, none without outliers): x's and CB's columns
   gathered, ``x[:, cols] @ (CB[:, cols] * SCB / 127)^T`` in the compute dtype added into that float32
   tile; bias in float32, one rounding to the compute dtype.

From ``INT_MM_MIN_M`` rows on, cuBLAS computes the int32 product (``torch._int_mm``, cuBLASLt's int8
tensor-core GEMM, as bitsandbytes does) and the same kernel, with ``PRODUCT_GIVEN``, runs only the
rest of step 3 on it (the epilogue). Both products are the exact int32 sum, so without outlier
columns the two paths give the same bits. With them, both add the outlier columns in the same groups
of 16; within a group, tile shapes with different MMA instructions may still sum differently.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reference_int8 import INT8_DEQUANT, INT8_SCALE_PRODUCT
from .triton_common import (autotuning, cdiv, chosen_config, dot, gemm_split, ieee_dot, m_bucket, mul_rn,
                            prune_gemm_configs, sum_partials)

# From this many rows of x on, cuBLAS multiplies the int8 matrices (torch._int_mm) and the GEMM kernel
# runs as the epilogue over its int32 result, which costs one more pass over an int32 [M, N]. Below,
# the fused kernel. A static estimate, like the 4-bit DEQUANT_MATMUL_MIN_M: at M = 2048 on 28672 x 8192
# (H100) the fused kernel took 1.886 ms against bf16's 1.385 ms, and bitsandbytes, whose int8 product
# is cuBLASLt's, 1.433 ms. The GPU layer benchmark times the other path at each M ("qpass int8 fused
# GEMM" from here on, "qpass int8 via cuBLAS" below).
INT_MM_MIN_M = 1024

# Outlier columns the GEMM kernel gathers per step (the K of one compute-dtype tl.dot: at least 16). A
# global constexpr, so Inductor's copy of the kernel keeps it.
OUTLIER_BLOCK = tl.constexpr(16)


@triton.jit
def _outlier_columns_kernel(x_ptr, mask_ptr, M, K, stride_xm, threshold,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
    hit = tl.max((tl.abs(x) >= threshold).to(tl.int32), axis=0)
    tl.atomic_max(mask_ptr + cols, hit, mask=cols < K)


@triton.jit
def _round_half_even(v):
    """``torch.round`` of float32 ``v`` (|v| < 2**23), ties to even. Nothing is added to ``v`` itself
    (``floor(v + 0.5)`` would invite the compiler to fuse that add into v's product as an FMA)."""
    r = tl.floor(v)
    below = v - r  # exact
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((below > 0.5) | ((below == 0.5) & odd), r + 1.0, r)


@triton.jit
def _quantize_rows_kernel(x_ptr, mask_ptr, ca_ptr, sca_ptr, columns_ptr, count_ptr, K, stride_xm, threshold,
                          HAS_OUTLIERS: tl.constexpr, SINGLE_ROW: tl.constexpr, BLOCK_K: tl.constexpr):
    # SINGLE_ROW (M = 1, decode): the outlier columns are this row's entries >= threshold, so the
    # program writes the mask itself and the mask kernel (and its zero fill) is skipped.
    # Program 0 writes the outlier column indices, in increasing order, to columns[0 : count] (the
    # rest of columns is left as it was) and count to count_ptr.
    m = tl.program_id(0)
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = tl.abs(tl.load(x_ptr + m * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32))
        if HAS_OUTLIERS:
            a = tl.where(a >= threshold, 0.0, a)
        absmax = tl.maximum(absmax, a)
    row_absmax = tl.max(absmax, axis=0)
    tl.store(sca_ptr + m, row_absmax)
    # torch evaluates the reference's ``127.0 / absmax`` as ``absmax.reciprocal() * 127``: two roundings
    scale = mul_rn(tl.div_rn(1.0, tl.where(row_absmax > 0, row_absmax, 1.0)), 127.0)
    found = tl.full((), 0, tl.int32)  # outlier columns before this chunk
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = _round_half_even(mul_rn(x, scale))
        if HAS_OUTLIERS:
            if SINGLE_ROW:
                outlier = (tl.abs(x) >= threshold) & (cols < K)
                tl.store(mask_ptr + cols, outlier.to(tl.int32), mask=cols < K)
            else:
                outlier = tl.load(mask_ptr + cols, mask=cols < K, other=0) != 0
            q = tl.where(outlier, 0.0, q)
            if m == 0:  # one program compacts the mask
                hit = outlier.to(tl.int32)
                tl.store(columns_ptr + found + tl.cumsum(hit, 0) - hit, cols, mask=outlier)
                found += tl.sum(hit, 0)
        tl.store(ca_ptr + m * K + cols, q.to(tl.int8), mask=cols < K)
    tl.store(count_ptr, found, mask=m == 0)  # 0 without outliers


@triton.jit
def _int8_gemm_kernel(
    ca_ptr, cb_ptr, product_ptr, sca_ptr, scb_ptr, x_ptr, columns_ptr, count_ptr, bias_ptr, out_ptr,
    # scale_product and dequant are constants (1 / 127² and 1 / 127) and compile-time: Inductor would
    # pass Python floats as float64 runtime arguments
    M, N, K, stride_xm, stride_om, M_BUCKET, K_PER_SPLIT, scale_product: tl.constexpr, dequant: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr, PRODUCT_GIVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Two K loops, so that one accumulator tile is live at a time (two would halve the tile that fits
    # in registers): the int8 loop into int32, scaled into float32 once, then the outlier loop adds
    # into that float32 tile, over the compacted outlier columns (columns[0 : count], see
    # _quantize_rows_kernel) that fall in this split's K range.
    # With several K splits (small M, see triton_common.gemm_split), each writes float32 partial sums to
    # out[split] and the bias comes after their sum. M_BUCKET (M rounded up to a power of two) only
    # keys the autotuner.
    #
    # PRODUCT_GIVEN (one split): CA @ CB^T comes computed, int32 [M, N] row-major at product_ptr, and
    # only the epilogue runs.
    #
    # The outlier loop visits only outlier columns: a layer of a real LLM has a few to a few dozen of
    # them in thousands, spread over K, so gathering them costs one or two OUTLIER_BLOCK-wide dots
    # where visiting each K tile that holds one (64-128 columns) would cost one dot per column.
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_start, k_end = split * K_PER_SPLIT, tl.minimum((split + 1) * K_PER_SPLIT, K)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows_m[:, None] < M) & (rows_n[None, :] < N)
    if PRODUCT_GIVEN:
        acc = tl.load(product_ptr + rows_m[:, None].to(tl.int64) * N + rows_n[None, :], mask=inside, other=0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(ca_ptr + rows_m[:, None] * K + cols[None, :], mask=(rows_m[:, None] < M) & (cols[None, :] < K),
                        other=0)
            b = tl.load(cb_ptr + rows_n[:, None] * K + cols[None, :], mask=(rows_n[:, None] < N) & (cols[None, :] < K),
                        other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    scb = tl.load(scb_ptr + rows_n, mask=rows_n < N, other=0.0)
    sca = tl.load(sca_ptr + rows_m, mask=rows_m < M, other=0.0)
    result = acc.to(tl.float32) * (sca[:, None] * scb[None, :]) * scale_product
    if HAS_OUTLIERS:
        count = tl.load(count_ptr)
        for j0 in range(0, count, OUTLIER_BLOCK):
            j = j0 + tl.arange(0, OUTLIER_BLOCK)
            cols = tl.load(columns_ptr + j, mask=j < count, other=0)
            take = (j < count) & (cols >= k_start) & (cols < k_end)
            x = tl.load(x_ptr + rows_m[:, None] * stride_xm + cols[None, :], mask=(rows_m[:, None] < M) & take[None, :],
                        other=0.0)
            b = tl.load(cb_ptr + rows_n[:, None] * K + cols[None, :], mask=(rows_n[:, None] < N) & take[None, :],
                        other=0)
            w = (b.to(tl.float32) * scb[:, None] * dequant).to(x_ptr.dtype.element_ty)
            result = dot(x, w, result, IEEE_DOT)
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows_n, mask=rows_n < N, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + (split * M + rows_m[:, None]) * stride_om + rows_n[None, :], result.to(out_ptr.dtype.element_ty),
             mask=inside)


def _gemm_configs():
    # Spill-free on sm_90 with the outlier loop compiled in, at 0.9-1.8 main-loop instructions per
    # weight (``benchmarks/compile_report.py``): with one accumulator live at a time and the outlier
    # loop's dots only OUTLIER_BLOCK deep, tiles up to 128 x 256 x 128 fit (216 registers). Triton 3.6
    # waits for every int8 wgmma (the report's tensor_cores column), so the 64- and 128-row tiles also
    # come with BLOCK_K = 128: half the waits per K. The large-M tiles also come with a fourth stage in
    # flight (96-128 KiB of shared memory): untuned on a GPU, M = 2048 ran at 0.73x bf16 with three.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=stages)
        for bm, bn, bk, w, stages in [
            (16, 64, 64, 4, 3), (16, 128, 128, 4, 3), (16, 256, 128, 8, 3), (64, 128, 128, 4, 3), (64, 128, 128, 8, 3),
            (64, 256, 128, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (128, 256, 128, 8, 3),
            (128, 128, 128, 8, 4), (128, 256, 64, 8, 4),
        ]
    ]


# The epilogue over a given int32 product (PRODUCT_GIVEN): memory-bound on the int32 read and the
# output write, so one config; its BLOCK_K is unused (the outlier loop gathers OUTLIER_BLOCK columns).
# Eight warps: 88 registers per thread on sm_90 (four warps need 144), so an SM holds programs with
# more threads in flight.
EPILOGUE_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2)

_int8_gemm_tuned = triton.autotune(_gemm_configs(), key=["M_BUCKET", "N", "K", "K_PER_SPLIT"], cache_results=True,
                                   prune_configs_by={"early_config_prune": prune_gemm_configs})(_int8_gemm_kernel)


class ActivationQuant(NamedTuple):
    """What ``int8_vectorwise_quant_triton`` computes of ``x [m, k]``."""

    ca: torch.Tensor  # int8 [m, k], outlier columns zeroed
    sca: torch.Tensor  # float32 [m], row absmax below the threshold
    mask: torch.Tensor  # int32 [k], 1 for outlier columns
    outlier_columns: torch.Tensor  # int32 [k]: the outlier column indices, increasing, in the first count
    outlier_count: torch.Tensor  # int32 [1] on the device (no host sync, static shapes)


def int8_vectorwise_quant_triton(x: torch.Tensor, threshold: float, launch=lambda kernel: kernel) -> ActivationQuant:
    """Row-wise int8 of a 2-D ``x`` with its outlier columns, as a mask and as a compacted list."""
    M, K = x.shape
    has_outliers = threshold > 0
    single_row = M == 1 and has_outliers  # the row kernel writes the whole mask
    mask = (torch.empty if single_row else torch.zeros)(K, device=x.device, dtype=torch.int32)
    if has_outliers and M > 0 and not single_row:
        grid = (cdiv(M, 32), cdiv(K, 128))
        launch(_outlier_columns_kernel)[grid](x, mask, M, K, x.stride(0), threshold, BLOCK_M=32, BLOCK_K=128)
    ca = torch.empty((M, K), device=x.device, dtype=torch.int8)
    sca = torch.empty((M,), device=x.device, dtype=torch.float32)
    columns = torch.empty((K,), device=x.device, dtype=torch.int32)
    count = (torch.zeros if M == 0 else torch.empty)((1,), device=x.device, dtype=torch.int32)  # row 0 writes it
    if M > 0:
        launch(_quantize_rows_kernel)[(M,)](x, mask, ca, sca, columns, count, K, x.stride(0), threshold,
                                            HAS_OUTLIERS=has_outliers, SINGLE_ROW=single_row, BLOCK_K=256)
    return ActivationQuant(ca, sca, mask, columns, count)


def int_mm_applies(m: int, out_features: int, in_features: int) -> bool:
    """Whether cuBLAS computes the int8 product (``torch._int_mm``): from INT_MM_MIN_M rows on, where
    its CUDA constraints hold too (more than 16 rows, in and out features multiples of 8)."""
    return m >= max(INT_MM_MIN_M, 17) and in_features % 8 == 0 and out_features % 8 == 0


def _launch(launch, config: triton.Config, M: int, N: int, split: int, args: tuple, statics: dict) -> None:
    """``_int8_gemm_kernel`` with one config (untuned, or the epilogue's) over its M x N tiles and splits."""
    grid = (cdiv(M, config.kwargs["BLOCK_M"]), cdiv(N, config.kwargs["BLOCK_N"]), split)
    launch(_int8_gemm_kernel)[grid](*args, **statics, **config.kwargs, num_warps=config.num_warps,
                                    num_stages=config.num_stages)


def linear_int8_triton(
    x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, threshold: float,
    compute_dtype: torch.dtype, launch=lambda kernel: kernel, autotune: bool = True,
    config: triton.Config | None = None, splits: int | None = None,
) -> torch.Tensor:
    """LLM.int8() linear of a 2-D ``x``, in ``compute_dtype``. ``autotune=False`` (or the interpreter)
    runs the GEMM's first config, ``config`` that one (the fused GEMM at any M, also where cuBLAS would
    multiply); ``splits`` sets the number of K splits instead of the heuristic (both for benchmarks and
    tests)."""
    x = x.to(compute_dtype).contiguous()
    M, K = x.shape
    N = cb.shape[0]
    ca, sca, _, columns, count = int8_vectorwise_quant_triton(x, threshold, launch)
    if M == 0:
        return torch.empty((M, N), device=x.device, dtype=compute_dtype)
    statics = dict(HAS_OUTLIERS=threshold > 0, IEEE_DOT=ieee_dot(compute_dtype), scale_product=INT8_SCALE_PRODUCT,
                   dequant=INT8_DEQUANT)
    if config is None and splits is None and int_mm_applies(M, N, K):
        out = torch.empty((M, N), device=x.device, dtype=compute_dtype)
        args = (ca, cb, torch._int_mm(ca, cb.t()), sca, scb, x, columns, count, bias if bias is not None else out, out,
                M, N, K, x.stride(0), N, m_bucket(M), K)
        statics.update(HAS_BIAS=bias is not None, PRODUCT_GIVEN=True)
        _launch(launch, EPILOGUE_CONFIG, M, N, 1, args, statics)
        return out
    split, k_per_split = gemm_split(M, N, K, splits)
    if split > 1:
        out = torch.empty((split, M, N), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((M, N), device=x.device, dtype=compute_dtype)
    args = (ca, cb, ca, sca, scb, x, columns, count, bias if bias is not None else out, out,
            M, N, K, x.stride(0), N, m_bucket(M), k_per_split)
    statics.update(HAS_BIAS=bias is not None and split == 1, PRODUCT_GIVEN=False)
    if autotuning(autotune, config):
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
        launch(_int8_gemm_tuned)[grid](*args, **statics)
    else:
        _launch(launch, chosen_config(_gemm_configs(), config, "int8 GEMM"), M, N, split, args, statics)
    return sum_partials(out, bias, compute_dtype) if split > 1 else out
