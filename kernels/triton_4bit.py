"""Triton kernels of the 4-bit linear: ``out = x @ dequant(W)^T + bias`` with dequantization fused.

Weight layout (bitsandbytes', unchanged, see ``reference_4bit``): ``W [N, K]`` flattened row-major;
element e = n * K + k has its 4-bit code in byte e // 2 (high nibble when e is even) and its scale in
``absmax[e // BLOCKSIZE]``; with double quantization the scale is
``nested_code[absmax[b]] * nested_absmax[b // 256] + offset``. Blocks may straddle rows when K is not
a multiple of BLOCKSIZE: every index is computed from e, so any K works.

Numerics (the contract of ``reference_matmul``): the weight is dequantized in float32, rounded to the
compute dtype, multiplied with ``x`` (in the compute dtype) accumulating in float32; bias is added in
float32 and the result is rounded once.

Two kernels, picked by M (rows of x):

* ``_gemv_kernel`` (M <= GEMV_MAX_M, decode): one program per (BLOCK_N outputs, K slice, row of x).
  Weights are dequantized in registers and reduced with ``tl.sum`` (no tensor cores at M=1); each K
  slice writes a float32 partial sum and the slices are added by one small reduction (split-K,
  deterministic, no atomics).
* ``_gemm_kernel`` (larger M, prefill/training): BLOCK_M x BLOCK_N tiles; each K step dequantizes a
  [BLOCK_N, BLOCK_K] weight tile in registers and feeds ``tl.dot`` (tensor cores).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .codebooks import DOUBLE_QUANT_BLOCKSIZE

GEMV_MAX_M = 4


@triton.jit
def _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, inside,
                  NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """float32 scale of each block index in ``block`` (any shape)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=inside, other=0.0) * tl.load(
            nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=inside, other=0.0
        ) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    return tl.where(inside, scale, 0.0)


@triton.jit
def _dequant_tile(
    packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    rows, k0, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    ROW_ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 W[rows, k0:k0 + BLOCK_K] (zero outside the matrix).

    ROW_ALIGNED (K % BLOCKSIZE == 0, so K is even and no block crosses a row; every LLM layer): the
    tile's bytes are loaded contiguously and split into nibbles with ``tl.join``, and each row loads
    one scale per block it covers. Otherwise every element computes its own byte and block index."""
    if ROW_ALIGNED:
        BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
        byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        inside_bytes = (rows[:, None] < N) & (byte_cols[None, :] < K // 2)
        byte = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + byte_cols[None, :], mask=inside_bytes, other=0)
        nibble = tl.join(byte >> 4, byte & 0xF).reshape(rows.shape[0], BLOCK_K).to(tl.int32)  # high nibble first
        value = tl.load(code_ptr + nibble)
        block_cols = k0 // BLOCKSIZE + tl.arange(0, BLOCKS)
        inside_blocks = (rows[:, None] < N) & (block_cols[None, :] < K // BLOCKSIZE)
        block = rows[:, None].to(tl.int64) * (K // BLOCKSIZE) + block_cols[None, :]
        scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, inside_blocks,
                              NESTED_BLOCKSIZE, DOUBLE_QUANT)
        per_block = tl.reshape(value, (rows.shape[0], BLOCKS, BLOCK_K // BLOCKS)) * scale[:, :, None]
        return tl.reshape(per_block, (rows.shape[0], BLOCK_K))
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < N) & (cols[None, :] < K)
        e = rows[:, None].to(tl.int64) * K + cols[None, :]
        byte = tl.load(packed_ptr + e // 2, mask=inside, other=0).to(tl.int32)
        nibble = tl.where(e % 2 == 0, byte >> 4, byte & 0xF)
        value = tl.load(code_ptr + nibble, mask=inside, other=0.0)
        scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, e // BLOCKSIZE, inside,
                              NESTED_BLOCKSIZE, DOUBLE_QUANT)
        return value * scale


@triton.jit
def _gemv_kernel(
    x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, partial_ptr,
    N, K, K_PER_SPLIT, stride_xm,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # partial[split, m, n] = sum over k in this split's slice of x[m, k] * W[n, k]
    pid_n, split, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k_offset in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = split * K_PER_SPLIT + k_offset
        cols = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                          rows, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + cols, mask=cols < K, other=0.0)
        # round both operands to the compute dtype, multiply and accumulate in float32
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.sum(w * x.to(tl.float32)[None, :], axis=1)
    M = tl.num_programs(2)
    tl.store(partial_ptr + (split * M + m) * N + rows, acc, mask=rows < N)


@triton.jit
def _gemm_kernel(
    x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, M_BUCKET,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[m, n] = round(sum_k x[m, k] * W[n, k] + bias[n]) over a BLOCK_M x BLOCK_N tile.
    # M_BUCKET (M rounded up to a power of two) only keys the autotuner.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + cols[None, :],
                    mask=(rows_m[:, None] < M) & (cols[None, :] < K), other=0.0)
        w = _dequant_tile(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                          rows_n, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, BLOCK_K)
        w = w.to(x_ptr.dtype.element_ty)
        if IEEE_DOT:  # exact float32 products of the rounded operands (fp32 compute, or the interpreter)
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=rows_n < N, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows_m[:, None] * stride_om + rows_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows_m[:, None] < M) & (rows_n[None, :] < N))


def _gemm_configs():
    # Each compiles for sm_90 without register spills and within an H100 block's shared memory
    # (``benchmarks/compile_report.py``, checked by ``tests/test_compile_report.py``).
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
        for bm, bn, bk, w in [
            (16, 64, 64, 4), (32, 64, 64, 4), (64, 64, 64, 8), (128, 64, 64, 8), (64, 128, 64, 8),
            (128, 128, 32, 8), (128, 256, 32, 8),
        ]
    ]


def _gemv_configs():
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
        for bn, bk, w in [(16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 8), (32, 128, 8)]
    ]


def ieee_dot(compute_dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` must take float32 operands with IEEE products: for float32 compute (Triton
    would use tf32 otherwise), and under ``TRITON_INTERPRET=1``, whose bf16 ``tl.dot`` is unusable."""
    return compute_dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _m_bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()  # autotune per power-of-two bucket of M, not per M


# Autotuned variants for real GPUs; the interpreter (TRITON_INTERPRET=1) uses the plain kernels with
# the first config. cache_results keeps tuning results on disk so a second process does not retune.
_gemm_tuned = triton.autotune(_gemm_configs(), key=["M_BUCKET", "N", "K"], cache_results=True)(_gemm_kernel)


def linear_4bit_triton(
    x: torch.Tensor, packed: torch.Tensor, quant_map: torch.Tensor, absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
    bias: torch.Tensor | None, out_features: int, in_features: int, blocksize: int,
    compute_dtype: torch.dtype, launch=lambda kernel: kernel, autotune: bool = True,
) -> torch.Tensor:
    """The 4-bit linear of a 2-D ``x``, in ``compute_dtype``. ``launch`` wraps each kernel before its
    launch (``torch.library.wrap_triton`` inside a ``triton_op``)."""
    x = x.to(compute_dtype).contiguous()
    M, K, N = x.shape[0], in_features, out_features
    packed = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    double_quant = nested_absmax is not None
    code = quant_map
    dq = (nested_absmax, nested_code, offset) if double_quant else (absmax, absmax, absmax)  # unused pointers
    statics = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=DOUBLE_QUANT_BLOCKSIZE, DOUBLE_QUANT=double_quant,
                   ROW_ALIGNED=K % blocksize == 0)
    if M <= GEMV_MAX_M:
        config = _gemv_configs()[2].kwargs
        block_k = config["BLOCK_K"]
        split_k = max(1, min(triton.cdiv(K, block_k), 8 if N < 8192 else 4))
        k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
        split_k = triton.cdiv(K, k_per_split)
        partial = torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(N, config["BLOCK_N"]), split_k, M)
        launch(_gemv_kernel)[grid](x, packed, code, absmax, *dq, partial, N, K, k_per_split, x.stride(0),
                                   **statics, **config)
        out = partial.sum(0)
        if bias is not None:
            out = out + bias.to(compute_dtype).float()
        return out.to(compute_dtype)
    out = torch.empty((M, N), device=x.device, dtype=compute_dtype)
    bias_arg = bias if bias is not None else out
    gemm_statics = dict(HAS_BIAS=bias is not None, IEEE_DOT=ieee_dot(compute_dtype))
    if autotune:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        launch(_gemm_tuned)[grid](x, packed, code, absmax, *dq, bias_arg, out, M, N, K, x.stride(0), out.stride(0),
                                  _m_bucket(M), **statics, **gemm_statics)
    else:
        config = _gemm_configs()[0].kwargs
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]))
        launch(_gemm_kernel)[grid](x, packed, code, absmax, *dq, bias_arg, out, M, N, K, x.stride(0), out.stride(0),
                                   _m_bucket(M), **statics, **gemm_statics, **config)
    return out
