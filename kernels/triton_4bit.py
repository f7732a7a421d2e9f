"""Triton kernels of the 4-bit linear: ``out = x @ dequant(W)^T + bias`` with dequantization fused.

Weight layout (bitsandbytes', unchanged, see ``reference_4bit``): ``W [N, K]`` flattened row-major;
element e = n * K + k has its 4-bit code in byte e // 2 (high nibble when e is even) and its scale in
``absmax[e // BLOCKSIZE]``; with double quantization the scale is
``nested_code[absmax[b]] * nested_absmax[b // 256] + offset``. Blocks may straddle rows when K is not
a multiple of BLOCKSIZE: every index is computed from e, so any K works.

Numerics (the contract of ``reference_matmul``): the weight is dequantized in float32, rounded to the
compute dtype, multiplied with ``x`` (in the compute dtype) accumulating in float32; bias is added in
float32 and the result is rounded once. Two paths scale after multiplying, so they round something
else than the weight, within one compute-dtype rounding per weight of the reference either way: the
GEMV never rounds (``scale * sum(code * x)`` in float32 per block), and GEMM tiles of at most 32 rows
whose K step is one block (not SWAP_AB) round the code value, not the scaled weight.

Three paths:

* ``_gemv_kernel`` (decode: M <= GEMV_MAX_M, K a multiple of BLOCKSIZE): PARTS neighbouring lanes
  per weight row, each reading 32 packed codes per step as two int64 words (one 16-byte load) so
  that a warp's load covers whole 32-byte runs of a row; x is read as int64 words too, unpacked in
  registers, once per thread for all the rows it holds; the code-book lookup is one warp shuffle per
  weight (``_shuffle_code``), whose nibble costs one shift and no mask. No tensor cores at M=1. The
  K range is split so that enough programs stream weights; each split writes float32 partial sums
  that one small reduction adds (deterministic, no atomics). Programs of the M rows of x for the
  same weight tile are adjacent in the grid, so the weight is read from DRAM once.
* ``_gemm_kernel`` (GEMV_MAX_M < M < DEQUANT_MATMUL_MIN_M, and M = 1 when the GEMV does not apply):
  BLOCK_M x BLOCK_N tiles; each K step dequantizes a [BLOCK_N, BLOCK_K] weight tile in registers
  and feeds ``tl.dot`` (tensor cores). For whole blocks per row, the lookup is a ``tl.gather`` per
  packed byte from 256 pairs of code values in multi-warp tiles (shared memory), a warp shuffle per
  nibble in single-warp tiles. Either the high and low nibbles stay in two half tiles that meet the
  even and odd columns of x in two dots (no interleave), or (SWAP_AB configs) they are joined into
  the weight tile and the dot is computed transposed, W @ x^T, so that Hopper's wgmma takes the
  weight from registers and runs asynchronously.
  For M <= GEMM_SPLIT_MAX_M the K range is split when the output tiles alone are too few programs
  for the GPU; the splits' float32 sums are added as in the GEMV.
* M >= DEQUANT_MATMUL_MIN_M: ``_dequant_kernel`` writes the weight in the compute dtype once (also the
  CUDA path of ``qpass::dequantize_4bit``, e.g. for the backward pass), then cuBLAS multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codebooks import DOUBLE_QUANT_BLOCKSIZE
from .triton_common import (INTERPRETED, autotuning, cdiv, chosen_config, dot, gemm_split, ieee_dot, m_bucket,
                            mul_rn, prune_gemm_configs, split_evenly, sum_partials)

# The GEMV repeats its lookups for each row of x (M x 4.2-5.8 instructions per weight), while the GEMM
# dequantizes a weight tile once for up to 16 rows (~6-7 instructions per weight): by the compile
# report, the GEMV only wins at M = 1.
GEMV_MAX_M = 1

# From this many rows of x on, the weight is dequantized once (one memory-bound pass) and multiplied by
# cuBLAS, as bitsandbytes does for M > 1: the fused GEMM would dequantize each weight M / BLOCK_M
# times (16 times at M = 2048 with 128-row tiles, ~9 instructions each). A static estimate; the GPU
# layer benchmark times the other path at each M ("qpass nf4 fused GEMM" from here on, "qpass nf4 via
# cuBLAS" below) to set it.
DEQUANT_MATMUL_MIN_M = 1024


@triton.jit
def _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, inside,
                  NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """float32 scale of each block index in ``block`` (any shape)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        # product rounded before the offset is added, as the reference does (no FMA)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=inside, other=0.0)
        scale = mul_rn(tl.load(nested_code_ptr + q, mask=inside, other=0.0), nested_scale) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    return tl.where(inside, scale, 0.0)


@triton.jit
def _pair_table(code_ptr):
    """The code book as a 256-entry int64 ``tl.gather`` table: entry b holds the bits of code[b >> 4]
    in its low and of code[b & 15] in its high 32 bits (the two weights of packed byte b). Programs of
    several warps gather through shared memory, where one 64-bit lookup per byte costs half the loads
    of one per nibble and needs no nibble extraction."""
    bits = tl.load(code_ptr + tl.arange(0, 16)).to(tl.uint32, bitcast=True).to(tl.uint64)
    return tl.reshape(bits[:, None] | (bits[None, :] << 32), (256,))


@triton.jit
def _shuffle_code(code_ptr, index):
    """float32 ``code_ptr[index & 15]`` for an int32 ``index`` of any shape and any value: the code-book
    value of the nibble in bits 0-3 of each element, whatever bits 4 and up hold.

    On the GPU, one warp shuffle per element: each lane reads code[lane & 15] (lanes L and L + 16 hold
    the same value) and ``shfl.sync.idx`` takes the value of lane ``index``. PTX defines that lane by
    bits 0-4 of the index alone, so the caller need not clear the bits above the nibble: a weight's
    nibble costs one shift, or none (bits 0-3 of a word), instead of a shift and a mask. Written in
    PTX because ``tl.gather`` requires in-range indices, and because which lane holds which element
    of a Triton tensor is the compiler's choice: the asm reads its own lane's value itself, so it is
    right in any layout and any number of warps. ptxas keeps one such read per loop step (every call
    reads the same address). Needs the whole warp converged, as straight-line kernel code is. The
    interpreter (no inline PTX) takes ``tl.gather`` of the masked index."""
    if INTERPRETED:
        table = tl.load(code_ptr + tl.arange(0, 16))
        return tl.reshape(tl.gather(table, tl.reshape(index & 0xF, (index.numel,)), 0), index.shape)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 lane; .reg .b64 address; .reg .f32 own;"
            " mov.u32 lane, %laneid; and.b32 lane, lane, 15; mad.wide.u32 address, lane, 4, $1;"
            " ld.global.nc.f32 own, [address]; shfl.sync.idx.b32 $0, own, $2, 31, -1; }",
            "=f,l,r", [code_ptr, index], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _code_halves(packed_ptr, code_ptr, pairs, rows, k0, N, K, BLOCK_K: tl.constexpr):
    """float32 code-book values (unscaled) of (W[rows, k0::2], W[rows, k0 + 1::2]) over k0 : k0 + BLOCK_K,
    zero outside the matrix, for K % BLOCKSIZE == 0 (no block crosses a row: every LLM layer).

    The tile's bytes load contiguously; high nibbles (even k) and low nibbles (odd k) stay apart, so
    the caller multiplies them with the even and odd columns of x (or joins them). The lookup is one
    ``tl.gather`` per byte from ``pairs`` (``_pair_table``), or where ``pairs`` is None one warp
    shuffle per nibble (``_shuffle_code``)."""
    HALF: tl.constexpr = BLOCK_K // 2
    BLOCK_N: tl.constexpr = rows.shape[0]
    byte_cols = k0 // 2 + tl.arange(0, HALF)
    inside_bytes = (rows[:, None] < N) & (byte_cols[None, :] < K // 2)
    byte = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + byte_cols[None, :], mask=inside_bytes, other=0)
    byte = tl.reshape(byte.to(tl.int32), (BLOCK_N * HALF,))
    if pairs is not None:
        pair = tl.reshape(tl.gather(pairs, byte, 0), (BLOCK_N, HALF))
        high = pair.to(tl.uint32).to(tl.float32, bitcast=True)
        low = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        byte = tl.reshape(byte, (BLOCK_N, HALF))
        high = _shuffle_code(code_ptr, byte >> 4)
        low = _shuffle_code(code_ptr, byte)  # bits 4-7, the high nibble, are ignored
    return high, low


@triton.jit
def _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, k0, N, K,
                 BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """float32 scales [rows, blocks of k0 : k0 + BLOCK_K] for K % BLOCKSIZE == 0 (one per block a row
    covers, at least one)."""
    BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
    block_cols = k0 // BLOCKSIZE + tl.arange(0, BLOCKS)
    inside_blocks = (rows[:, None] < N) & (block_cols[None, :] < K // BLOCKSIZE)
    block = rows[:, None].to(tl.int64) * (K // BLOCKSIZE) + block_cols[None, :]
    return _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, inside_blocks,
                         NESTED_BLOCKSIZE, DOUBLE_QUANT)


@triton.jit
def _dequant_halves(
    packed_ptr, code_ptr, pairs, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, k0, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 (W[rows, k0::2], W[rows, k0 + 1::2]): ``_code_halves`` times each block's scale."""
    HALF: tl.constexpr = BLOCK_K // 2
    BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
    BLOCK_N: tl.constexpr = rows.shape[0]
    high, low = _code_halves(packed_ptr, code_ptr, pairs, rows, k0, N, K, BLOCK_K)
    scale = _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, k0, N, K,
                         BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, BLOCK_K)[:, :, None]
    high = tl.reshape(tl.reshape(high, (BLOCK_N, BLOCKS, HALF // BLOCKS)) * scale, (BLOCK_N, HALF))
    low = tl.reshape(tl.reshape(low, (BLOCK_N, BLOCKS, HALF // BLOCKS)) * scale, (BLOCK_N, HALF))
    return high, low


@triton.jit
def _dequant_tile(
    packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, k0, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 W[rows, k0:k0 + BLOCK_K] (zero outside the matrix) for any K: blocks and bytes may
    straddle rows, so every element computes its own byte and block index."""
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
def _weight_tile(
    packed_ptr, pairs, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows, k0, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 W[rows, k0:k0 + BLOCK_K], zero outside the matrix: ``_dequant_halves`` joined back into
    row order (``pairs`` as there) for whole blocks per row, else ``_dequant_tile``."""
    if ROW_ALIGNED:
        high, low = _dequant_halves(packed_ptr, code_ptr, pairs, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                                    offset_ptr, rows, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, BLOCK_K)
        w = tl.reshape(tl.join(high, low), (rows.shape[0], BLOCK_K))
    else:
        w = _dequant_tile(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                          rows, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, BLOCK_K)
    return w


@triton.jit
def _x_element(word, p, X_DTYPE: tl.constexpr):
    """float32 value of x element p of a little-endian int64 ``word`` of x elements (in X_DTYPE)."""
    if X_DTYPE == tl.float32:
        return (word >> (32 * p)).to(tl.int32).to(tl.float32, bitcast=True)
    elif X_DTYPE == tl.bfloat16:  # a bfloat16 is the top half of a float32
        half = (word >> (32 * (p // 2))).to(tl.int32)
        if p % 2 == 0:
            return (half << 16).to(tl.float32, bitcast=True)
        else:
            return (half & -65536).to(tl.float32, bitcast=True)
    else:
        return (word >> (16 * p)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _qword_dot(qword, x_words, live, code_ptr, X_DTYPE: tl.constexpr):
    """float32 sums over the 16 codes of each int64 ``qword`` ([GROUPS, ROWS, PARTS]) of code-book value
    times x, with x's 16 elements read as int64 words from ``x_words`` ([PARTS], the first element's
    word; the same x for all rows). Byte i of a qword (little-endian) holds elements 2i (high nibble)
    and 2i + 1. Products accumulate through ``tl.fma``: one FFMA each, whether or not the compiler may
    contract ``a * b + c`` (Triton 3.10 stops doing so by default)."""
    X_PER_WORD: tl.constexpr = 64 // X_DTYPE.primitive_bitwidth
    total = tl.zeros(qword.shape, dtype=tl.float32)
    for w in tl.static_range(16 // X_PER_WORD):
        x_word = tl.load(x_words + w, mask=live, other=0)
        for p in tl.static_range(X_PER_WORD):
            j = w * X_PER_WORD + p
            nibble = (qword >> (8 * (j // 2) + 4 * (1 - j % 2))).to(tl.int32)  # bits 4 and up: the next codes
            total = tl.fma(_shuffle_code(code_ptr, nibble), _x_element(x_word, p, X_DTYPE)[None, None, :], total)
    return total


@triton.jit
def _gemv_kernel(
    x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, partial_ptr,
    N, K, BLOCKS_PER_SPLIT, stride_xm,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTS: tl.constexpr, LOAD_STAGES: tl.constexpr,
):
    # partial[split, m, n] = sum over this split's part of row n of
    #     scale[n, block(k)] * x[m, k] * code[n, k]
    #
    # Programs over BLOCK_N rows, as [GROUPS, ROWS, PARTS] lanes: ROWS rows of PARTS neighbouring lanes
    # (32 lanes), each lane reading 32 codes per step (16 bytes as two int64 qwords; the row's
    # 16 * PARTS bytes of a step are one contiguous run, 16-byte aligned, see gemv_applies). The x
    # elements depend on the part only, so a thread reads them once (as int64 words, unpacked in
    # registers) for all the rows of that part it holds. The code-book lookup is one warp shuffle per
    # weight (_shuffle_code), fed the code shifted down, unmasked. A lane's 32 codes lie inside one
    # quantization block (BLOCKSIZE >= 32): their float32 dot is scaled once; each row's PARTS lanes
    # are summed at the end.
    # LOAD_STAGES 0: a step waits for its own loads (other warps hide the latency); an int: Triton
    # pipelines every load of the loop (codes, x, the absmax -> nested code chain) that many steps
    # deep through shared memory.
    X_PER_WORD: tl.constexpr = 64 // x_ptr.dtype.element_ty.primitive_bitwidth
    ROWS: tl.constexpr = 32 // PARTS
    GROUPS: tl.constexpr = BLOCK_N // ROWS
    tl.static_assert(BLOCK_N % ROWS == 0, "BLOCK_N must be a multiple of 32 // PARTS")
    m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    part = tl.arange(0, PARTS)
    rows = pid_n * BLOCK_N + tl.arange(0, GROUPS)[:, None] * ROWS + tl.arange(0, ROWS)[None, :]  # [GROUPS, ROWS]
    inside_rows = rows < N
    step_words = tl.arange(0, 2 * PARTS)  # the int64 words a row reads per step, contiguous
    qwords = (packed_ptr.to(tl.pointer_type(tl.int64)) + rows.to(tl.int64)[:, :, None] * (K // 32 * 2)
              + step_words[None, None, :])
    row_blocks = rows.to(tl.uint64)[:, :, None] * (K // BLOCKSIZE)
    x_words = (x_ptr + m * stride_xm).to(tl.pointer_type(tl.int64))
    k_first = split * BLOCKS_PER_SPLIT * BLOCKSIZE
    k_last = tl.minimum(k_first + BLOCKS_PER_SPLIT * BLOCKSIZE, K)
    acc = tl.zeros((GROUPS, ROWS, PARTS), dtype=tl.float32)
    for k0 in tl.range(k_first, k_last, 32 * PARTS, num_stages=LOAD_STAGES if LOAD_STAGES else None):
        k = k0 + 32 * part  # first element of each part's 32
        live = k < k_last
        inside = inside_rows[:, :, None] & live[None, None, :]
        live_words = k0 + 32 * (step_words // 2) < k_last  # a pair of words per part
        words = tl.load(qwords + k0 // 32 * 2, mask=inside_rows[:, :, None] & live_words[None, None, :], other=0)
        first, second = tl.split(tl.reshape(words, (GROUPS, ROWS, PARTS, 2)))
        lane_x = x_words + k // X_PER_WORD
        lane_dot = _qword_dot(first, lane_x, live, code_ptr, x_ptr.dtype.element_ty)
        lane_dot += _qword_dot(second, lane_x + 16 // X_PER_WORD, live, code_ptr, x_ptr.dtype.element_ty)
        block = row_blocks + (k.to(tl.uint32) // BLOCKSIZE).to(tl.uint64)[None, None, :]
        scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, inside,
                              NESTED_BLOCKSIZE, DOUBLE_QUANT)
        acc = tl.fma(lane_dot, scale, acc)
    M = tl.num_programs(0)
    out_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(partial_ptr + (split * M + m) * N + out_rows, tl.reshape(tl.sum(acc, axis=2), (BLOCK_N,)),
             mask=out_rows < N)


@triton.jit
def _gemm_kernel(
    x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, M_BUCKET, K_PER_SPLIT,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LOAD_STAGES: tl.constexpr, SWAP_AB: tl.constexpr, PAIR_LOOKUP: tl.constexpr,
):
    # out[split, m, n] = round(sum over this split's k of x[m, k] * W[n, k] (+ bias[n])) over a
    # BLOCK_M x BLOCK_N tile. With one split, out is the [M, N] result in the compute dtype; with
    # several, a float32 [splits, M, N] buffer of partial sums (bias added after their sum).
    # M_BUCKET (M rounded up to a power of two) only keys the autotuner.
    #
    # Short tiles whose K step is one quantization block multiply the rounded code values and scale
    # the step's float32 sums once per output (BLOCK_M x BLOCK_N multiplies per step instead of one
    # per weight): the weight's rounding is then the code's, an error of the same size.
    #
    # LOAD_STAGES 0: the kernel's num_stages pipelines the loads feeding tl.dot (x and the codes)
    # only, and each step waits for its scales (a 1-byte absmax load, then the nested code it indexes);
    # an int: every load of the loop, the scale chain included, is pipelined that many steps deep.
    #
    # SWAP_AB: the tile is computed transposed, acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T, with the
    # weight whole (high and low nibbles joined) as the dot's first operand. On Hopper, wgmma reads
    # its first operand from registers and its second from shared memory, so the dequantized weight
    # goes straight from registers into the tensor cores, x from the pipeline's shared-memory buffer,
    # and the dots stay asynchronous across steps; without SWAP_AB the dequantized tile goes through
    # shared memory each step, and the 64- and 128-row tiles wait for every wgmma (the compile
    # report's tensor_cores column). The swap also puts the weight's BLOCK_N (a multiple of 64) on
    # wgmma's 64-row side, so M = 16 tiles use wgmma too.
    #
    # PAIR_LOOKUP: code-book lookups a byte at a time from 256 value pairs (see _pair_table); set for
    # multi-warp programs, whose gathers go through shared memory.
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    SCALE_AFTER_DOT: tl.constexpr = BLOCK_K == BLOCKSIZE and BLOCK_M <= 32 and not SWAP_AB
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    pairs = _pair_table(code_ptr) if PAIR_LOOKUP else None  # without: lookups by warp shuffle
    k_first = split * K_PER_SPLIT
    k_last = tl.minimum(k_first + K_PER_SPLIT, K)
    for k0 in tl.range(k_first, k_last, BLOCK_K, num_stages=LOAD_STAGES if LOAD_STAGES else None):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + cols[None, :],
                    mask=(rows_m[:, None] < M) & (cols[None, :] < K), other=0.0)
        if ROW_ALIGNED and SCALE_AFTER_DOT:  # the step is one quantization block
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            c_even, c_odd = _code_halves(packed_ptr, code_ptr, pairs, rows_n, k0, N, K, BLOCK_K)
            step = dot(x_even, c_even.to(x_ptr.dtype.element_ty), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                        IEEE_DOT)
            step = dot(x_odd, c_odd.to(x_ptr.dtype.element_ty), step, IEEE_DOT)
            scale = _tile_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows_n, k0, N, K,
                                 BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, BLOCK_K)
            acc = tl.fma(step, tl.reshape(scale, (1, BLOCK_N)), acc)
        elif ROW_ALIGNED and not SWAP_AB:  # even and odd columns of x against the high and low nibbles
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            w_even, w_odd = _dequant_halves(packed_ptr, code_ptr, pairs, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                                            offset_ptr, rows_n, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                                            BLOCK_K)
            acc = dot(x_even, w_even.to(x_ptr.dtype.element_ty), acc, IEEE_DOT)
            acc = dot(x_odd, w_odd.to(x_ptr.dtype.element_ty), acc, IEEE_DOT)
        else:  # the whole weight tile
            w = _weight_tile(packed_ptr, pairs, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                             rows_n, k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, BLOCK_K)
            if SWAP_AB:
                acc = dot(w.to(x_ptr.dtype.element_ty), x, acc, IEEE_DOT)
            else:
                acc = dot(x, w.to(x_ptr.dtype.element_ty), acc, IEEE_DOT)
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=rows_n < N, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + (split * M + rows_m[:, None]) * stride_om + rows_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows_m[:, None] < M) & (rows_n[None, :] < N))


@triton.jit
def _dequant_kernel(
    packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N, K,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[n, k] = W[n, k] in out's dtype, over a BLOCK_N x BLOCK_K tile (the reference's arithmetic:
    # code * scale in float32, one rounding).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    pairs = _pair_table(code_ptr)  # four warps (DEQUANT_CONFIG): gathers through shared memory
    w = _weight_tile(packed_ptr, pairs, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rows,
                     k0, N, K, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED, BLOCK_K)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < K))


DEQUANT_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4)


def _gemm_configs():
    # Each compiles for sm_90 without register spills and within an H100 block's shared memory, at
    # 4.8-9.7 main-loop instructions per weight, with Triton 3.6 (torch 2.11-2.13) and 3.9 (torch 2.15)
    # (``benchmarks/compile_report.py``, checked by ``tests/test_compile_report.py``). No tile sits at
    # the register limit: the 128 x 256 x 64 tiles took 252-255 registers with 3.6 and spilled with 3.9;
    # the 128 x 256 tiles step through K 32 columns at a time (212-222 registers).
    # Single-warp tiles do the lookup by warp shuffle instead of shared memory (5.3-5.8): for small M,
    # with split-K supplying the programs. Multi-warp tiles look up a byte at a time (PAIR_LOOKUP):
    # 0.6-1.3 instructions per weight fewer than by shuffles.
    #
    # LOAD_STAGES (see _gemm_kernel): 0 pipelines only the loads that feed tl.dot (x and the codes,
    # num_stages deep); 3 pipelines every load of the loop 3 deep, the scale chain too. The second
    # variant exists for the mma.sync tiles (BLOCK_M <= 32) only: the wgmma tiles compile the same;
    # the single-warp 16 x 32 tile spills with it (ptxas gives it 128 registers).
    #
    # SWAP_AB tiles (W @ x^T, see _gemm_kernel) compile to asynchronous wgmma with the dequantized
    # weight read from registers, from BLOCK_M = 16 up (the others: mma.sync up to BLOCK_M = 32, and
    # wgmma waited for at every step from 64); they need BLOCK_N a multiple of 64 per four warps.
    # LOAD_STAGES 3 compiles the same as 0 for them. 120-224 registers, 6.6-7.0 instructions per
    # weight (8.1-8.4 for the 128 x 256 x 32 tile, 9.0-9.7 for the 128 x 128 one).
    plain = [
        (16, 32, 64, 1, 0), (16, 64, 64, 1, 0), (16, 64, 64, 4, 0), (16, 128, 64, 4, 0), (16, 256, 64, 8, 0),
        (32, 128, 64, 4, 0), (64, 128, 64, 4, 0), (128, 128, 64, 8, 0), (128, 256, 32, 8, 0),
        (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (16, 256, 64, 8, 3), (32, 128, 64, 4, 3),
    ]
    swapped = [(16, 128, 64, 4), (16, 256, 64, 8), (32, 128, 64, 4), (64, 128, 64, 4), (64, 256, 64, 8),
               (128, 128, 64, 8), (128, 256, 32, 8)]
    tiles = [(*tile, False) for tile in plain] + [(*tile, 0, True) for tile in swapped]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "LOAD_STAGES": stages, "SWAP_AB": swap,
                       "PAIR_LOOKUP": w > 1}, num_warps=w, num_stages=3)
        for bm, bn, bk, w, stages, swap in tiles
    ]


def _gemv_configs():
    # PARTS lanes share a row (PARTS * 16 contiguous bytes per step). Few rows per program and many
    # programs measured fastest on an H100 with the previous GEMV, 8 bytes per lane and step
    # (benchmarks/results/h100/gemv_layouts.json: 28672x8192 105 us at 16 rows, 138 us at 64).
    # Single-warp layouts come plain (LOAD_STAGES 0: a step's loads are waited for in that step) and
    # with every load software-pipelined 3 steps ahead through shared memory (+1.4-1.8 instructions
    # per weight, +6-17 registers by the compile report): latency hidden by the program itself rather
    # than by other warps. An H100 SM holds at most 32 programs, so single-warp programs of 63-72
    # registers leave it 28-32 warps; the 2- and 4-warp programs of 16 rows per warp take 40 registers
    # (4.8-5.0 instructions per weight), room for 48 warps on an SM: more loads in flight.
    single_warp = [triton.Config({"BLOCK_N": bn, "PARTS": parts, "LOAD_STAGES": stages}, num_warps=1)
                   for bn, parts in [(16, 4), (8, 4), (8, 8), (16, 8), (32, 4)] for stages in (0, 3)]
    return single_warp + [triton.Config({"BLOCK_N": 16 * warps, "PARTS": 4, "LOAD_STAGES": 0}, num_warps=warps)
                          for warps in (2, 4)]


# Autotuned variants for real GPUs; the interpreter (TRITON_INTERPRET=1) uses the plain kernels with
# the first config. cache_results keeps tuning results on disk so a second process does not retune.
_gemm_tuned = triton.autotune(_gemm_configs(), key=["M_BUCKET", "N", "K", "K_PER_SPLIT"], cache_results=True,
                              prune_configs_by={"early_config_prune": prune_gemm_configs})(_gemm_kernel)
_gemv_tuned = triton.autotune(_gemv_configs(), key=["N", "K", "BLOCKS_PER_SPLIT"], cache_results=True)(_gemv_kernel)

# Split-K of the GEMV: enough programs to keep every SM streaming weights (an H100 holds 32 one-warp
# programs on each of its 132 SMs) when rows alone do not make enough of them.
GEMV_TARGET_PROGRAMS = 16384  # measured: 28672x8192 fastest at 16 splits of 1792 programs, 4096x4096 at 8-16 of 256
GEMV_ROWS_PER_PROGRAM = 16  # the typical tuned BLOCK_N, used only to size the split
GEMV_MIN_BLOCKS_PER_SPLIT = 8  # 4096x4096: 8 and 16 splits (8 and 4 blocks each) equally fast


def gemv_applies(m: int, in_features: int, blocksize: int, packed: torch.Tensor) -> bool:
    """Whether the GEMV kernel runs: few rows of x, whole quantization blocks per weight row (every
    LLM layer), blocks of whole 32-code lane steps, and packed bytes that can be read 16 at a time
    (16-byte aligned; torch allocations are, views at an offset may not be)."""
    return (m <= GEMV_MAX_M and in_features % blocksize == 0 and blocksize % 32 == 0
            and packed.storage_offset() * packed.element_size() % 16 == 0)


def gemv_split(out_features: int, in_features: int, blocksize: int, wanted: int | None = None) -> tuple[int, int]:
    """(number of K splits, quantization blocks per split) of the GEMV for a weight shape; ``wanted``
    overrides the heuristic's number of splits (benchmarks sweep it)."""
    blocks_per_row = in_features // blocksize
    if wanted is not None:
        return split_evenly(blocks_per_row, wanted, most=blocks_per_row)
    wanted = cdiv(GEMV_TARGET_PROGRAMS, cdiv(out_features, GEMV_ROWS_PER_PROGRAM))
    return split_evenly(blocks_per_row, wanted, most=blocks_per_row // GEMV_MIN_BLOCKS_PER_SPLIT)


def _kernel_operands(packed, quant_map, absmax, nested_absmax, nested_code, offset):
    """The packed codes as flat bytes (whatever their quant_storage view), the code book as float32 (the
    kernels read its bits as float32: the format stores it so, a direct op call may pass another
    dtype), and the three double quantization pointers (absmax stands in for them, unused, without
    double quantization)."""
    packed = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    nested = (nested_absmax, nested_code, offset) if nested_absmax is not None else (absmax, absmax, absmax)
    return packed, quant_map.to(torch.float32), nested


def dequantize_4bit_triton(
    packed: torch.Tensor, quant_map: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None, offset: torch.Tensor | None, out_features: int, in_features: int,
    blocksize: int, dtype: torch.dtype, launch=lambda kernel: kernel,
) -> torch.Tensor:
    """The weight ``[out_features, in_features]`` in ``dtype``, bit for bit the reference's."""
    N, K = out_features, in_features
    packed, quant_map, dq = _kernel_operands(packed, quant_map, absmax, nested_absmax, nested_code, offset)
    double_quant = nested_absmax is not None
    out = torch.empty((N, K), device=packed.device, dtype=dtype)
    grid = (cdiv(N, DEQUANT_CONFIG.kwargs["BLOCK_N"]), cdiv(K, DEQUANT_CONFIG.kwargs["BLOCK_K"]))
    launch(_dequant_kernel)[grid](
        packed, quant_map, absmax, *dq, out, N, K, BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=DOUBLE_QUANT_BLOCKSIZE,
        DOUBLE_QUANT=double_quant, ROW_ALIGNED=K % blocksize == 0, **DEQUANT_CONFIG.kwargs,
        num_warps=DEQUANT_CONFIG.num_warps)
    return out


def linear_4bit_triton(
    x: torch.Tensor, packed: torch.Tensor, quant_map: torch.Tensor, absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
    bias: torch.Tensor | None, out_features: int, in_features: int, blocksize: int,
    compute_dtype: torch.dtype, launch=lambda kernel: kernel, autotune: bool = True,
    config: triton.Config | None = None, splits: int | None = None,
) -> torch.Tensor:
    """The 4-bit linear of a 2-D ``x``, in ``compute_dtype``. ``launch`` wraps each kernel before its
    launch (``torch.library.wrap_triton`` inside a ``triton_op``). ``autotune=False`` (or the
    interpreter) runs each kernel's first config; ``config`` runs that one (of the GEMV's or GEMM's
    kind, whichever M picks) and ``splits`` sets the number of K splits instead of the heuristic: both
    for benchmarks and tests."""
    x = x.to(compute_dtype).contiguous()
    M, K, N = x.shape[0], in_features, out_features
    packed, quant_map, dq = _kernel_operands(packed, quant_map, absmax, nested_absmax, nested_code, offset)
    double_quant = nested_absmax is not None
    statics = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=DOUBLE_QUANT_BLOCKSIZE, DOUBLE_QUANT=double_quant,
                   ROW_ALIGNED=K % blocksize == 0)
    tuned = autotuning(autotune, config)
    if M >= DEQUANT_MATMUL_MIN_M:
        weight = dequantize_4bit_triton(packed, quant_map, absmax, nested_absmax, nested_code, offset, N, K,
                                        blocksize, compute_dtype, launch)
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(compute_dtype))
    if gemv_applies(M, K, blocksize, packed):
        if x.storage_offset() * x.element_size() % 8:  # the kernel reads x as int64 words
            x = x.clone()
        split, blocks_per_split = gemv_split(N, K, blocksize, splits)
        partial = torch.empty((split, M, N), device=x.device, dtype=torch.float32)
        args = (x, packed, quant_map, absmax, *dq, partial, N, K, blocks_per_split, x.stride(0))
        gemv_statics = {name: value for name, value in statics.items() if name != "ROW_ALIGNED"}
        if tuned:
            grid = lambda meta: (M, cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
            launch(_gemv_tuned)[grid](*args, **gemv_statics)
        else:
            config = chosen_config(_gemv_configs(), config, "4-bit GEMV")
            launch(_gemv_kernel)[(M, cdiv(N, config.kwargs["BLOCK_N"]), split)](
                *args, **gemv_statics, **config.kwargs, num_warps=config.num_warps)
        return sum_partials(partial, bias, compute_dtype)
    split, k_per_split = gemm_split(M, N, K, splits)
    if split > 1:
        out = torch.empty((split, M, N), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((M, N), device=x.device, dtype=compute_dtype)
    bias_arg = bias if bias is not None else out
    gemm_statics = dict(HAS_BIAS=bias is not None and split == 1, IEEE_DOT=ieee_dot(compute_dtype))
    args = (x, packed, quant_map, absmax, *dq, bias_arg, out, M, N, K, x.stride(0), N, m_bucket(M), k_per_split)
    if tuned:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
        launch(_gemm_tuned)[grid](*args, **statics, **gemm_statics)
    else:
        config = chosen_config(_gemm_configs(), config, "4-bit GEMM")
        grid = (cdiv(M, config.kwargs["BLOCK_M"]), cdiv(N, config.kwargs["BLOCK_N"]), split)
        launch(_gemm_kernel)[grid](*args, **statics, **gemm_statics, **config.kwargs, num_warps=config.num_warps,
                                   num_stages=config.num_stages)
    return sum_partials(out, bias, compute_dtype) if split > 1 else out
