"""Plain-torch reference kernels of the bitsandbytes 4-bit blockwise formats (NF4, FP4).

These run on any device and define the arithmetic bit for bit; faster kernels must agree with them.

Layout of a quantized ``[out_features, in_features]`` weight ``W`` (n = out * in elements):

* ``W`` is flattened row-major and cut into blocks of ``blocksize`` elements (a power of two, 32..4096);
  the last block may be short.
* ``absmax``: float32 ``[ceil(n / blocksize)]``, the max |w| of each block.
* ``packed``: uint8 ``[(n + 1) // 2, 1]``; element 2i sits in the HIGH nibble of byte i, element 2i+1
  in the low nibble (a trailing odd element is paired with a zero nibble).
* Double quantization replaces ``absmax`` by uint8 codes ``[ceil(n / blocksize)]`` into the signed
  dynamic map, blockwise over 256 absmax values, plus ``nested_absmax`` float32
  ``[ceil(n_blocks / 256)]`` and ``offset`` = float32 scalar mean of the original absmax:
  ``absmax = nested_code[code] * nested_absmax[i // 256] + offset``.
"""

from __future__ import annotations

import math

import torch

from .codebooks import FP4_RANK_TO_CODE, code_4bit

_TINY = 1e-38  # bitsandbytes clamps a zero absmax to this before dividing by it


def _sorted_midpoints(code: torch.Tensor) -> torch.Tensor:
    values = code.sort().values
    return (values[:-1] + values[1:]) / 2


def quantize_4bit(weight: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (any shape, fp32/fp16/bf16) to packed 4-bit codes and float32 block absmax.

    The arithmetic is bitsandbytes 0.50's (``backends/default/ops.py: quantize_4bit``): full blocks are
    scaled by ``x * (1 / max(absmax, 1e-38))``, the short last block by ``x / max(absmax, 1e-38)`` (and
    its stored absmax is the clamped one), both clamped to [-1, 1], then bucketized on the midpoints of
    the sorted code book (a value on a midpoint takes the lower code).
    """
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = torch.linalg.vector_norm(blocks, float("inf"), dim=-1)  # max |x| without a |x| temporary
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY).unsqueeze(-1))).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    code = code_4bit(quant_type, weight.device)
    rank = torch.bucketize(scaled, _sorted_midpoints(code), out_int32=True)
    if quant_type == "fp4":
        rank = torch.tensor(FP4_RANK_TO_CODE, dtype=torch.uint8, device=weight.device)[rank.long()]
    nibbles = rank.to(torch.uint8)
    packed = (nibbles[0::2] << 4) | nibbles[1::2]
    return packed.unsqueeze(1), absmax


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor, whatever dtype they are stored as (``quant_storage``)."""
    return packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)


def byte_pair_code(code: torch.Tensor) -> torch.Tensor:
    """int64 ``[256]``: entry ``b`` holds the float32 values of packed byte ``b``'s two codes, high nibble
    first (``code[b >> 4], code[b & 15]``), as the 8 bytes of one word. Gathering these words by byte
    and viewing the result as float32 decodes two weights per lookup, bits untouched."""
    code = code.float()
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=-1)  # [256, 2] float32
    return pairs.view(torch.int64).reshape(256)


_LUT_STEPS = 65535  # the 8-bit quantizer reads codes from a table over 65536 evenly spaced points of [-1, 1]


def _blockwise_8bit_lut(code: torch.Tensor) -> torch.Tensor:
    """uint8 ``[65536]``: for grid point i (``v = (i + i) / 65535 - 1`` in float32), the number of
    midpoints ``(code[j] + code[j + 1]) * 0.5`` strictly below v, i.e. the nearest code, ties low."""
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_LUT_STEPS + 1, dtype=torch.float32, device=code.device)
    grid = (grid + grid) / float(_LUT_STEPS) - 1.0
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a float32 vector against a sorted 256-value ``code``.

    Bit-exact with bitsandbytes 0.50's CPU ``quantize_blockwise`` (``quantize_cpu_impl``), which reads
    codes from a 65536-entry table rather than searching: per block ``absmax = max |x|`` (a zero block
    gets code 0 everywhere); ``v = clamp(x * (1 / absmax), -1, 1)``; ``t = (v + 1) * 0.5``;
    ``i = trunc(fma(65535, t, 0.5))`` (one float32 rounding); code = ``lut[i]`` (``_blockwise_8bit_lut``).
    Returns uint8 codes ``[n]`` and float32 absmax ``[ceil(n / blocksize)]``.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=-1)
    inverse = 1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    v = torch.clamp(padded * inverse.unsqueeze(-1), -1.0, 1.0)
    t = (v + 1.0) * 0.5
    # 65535 * t + 0.5 is exact in float64; rounding it once to float32 is what the fused multiply-add does.
    index = (t.double() * _LUT_STEPS + 0.5).float().trunc().long()
    codes = _blockwise_8bit_lut(code)[index]
    codes = torch.where((absmax > 0).unsqueeze(-1), codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n].clone(), absmax  # clone: not a view into the padded blocks


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int) -> torch.Tensor:
    """float32 ``code[codes[i]] * absmax[i // blocksize]``."""
    values = torch.index_select(code.float(), 0, codes.reshape(-1).int())
    return _scale_blocks_(values, absmax.float(), blocksize)


def _scale_blocks_(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] *= scales[i // blocksize]`` in place, the last block possibly short; returns ``values``."""
    n_full = values.numel() - values.numel() % blocksize
    values[:n_full].view(-1, blocksize).mul_(scales[: n_full // blocksize].unsqueeze(-1))
    if n_full < values.numel():
        values[n_full:].mul_(scales[-1])
    return values


def block_absmax(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int,
) -> torch.Tensor:
    """float32 per-block absmax, undoing double quantization when ``nested_absmax`` is given."""
    if nested_absmax is None:
        return absmax.float()
    if nested_code is None or offset is None:
        raise ValueError("double-quantized absmax needs nested_code and offset too")
    return dequantize_blockwise_8bit(absmax, nested_absmax, nested_code, nested_blocksize) + offset


def dequantize_4bit(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``code[nibble] * absmax[block]`` in float32, then cast to ``dtype``, reshaped to ``shape``.

    ``code`` is the 16-value float32 code book (``quant_map``), ``absmax`` the float32 block scales."""
    numel = 1
    for s in shape:
        numel *= s
    # one 8-byte gather per packed byte (index_select, int32 indices): on CPU several times faster than
    # indexing the code book with unpacked int64 nibbles, for the same float32 values
    pairs = torch.index_select(byte_pair_code(code), 0, packed_bytes(packed).int())
    values = _scale_blocks_(pairs.view(torch.float32)[:numel], absmax.float(), blocksize)
    return values.view(shape).to(dtype)



class RowDecoder4bit:
    """A 4-bit weight decoded a block of rows at a time, for the blocked matmuls of ``reference_matmul``
    (a ``RowDecoder``): rows ``[start, stop)`` of ``dequantize_4bit(packed, code, scales, ...)`` rounded to
    ``dtype``, as float32 ``[stop - start, in_features]``.

    ``row_step`` rows hold about ``block_weights`` weights (``reference_matmul.BLOCK_WEIGHTS`` in the ops)
    and a whole number of quantization blocks, so
    each block of rows starts at a block's first weight, and so at a byte (block sizes are even). The
    decoding is ``dequantize_4bit``'s (one 8-byte gather per packed byte, then the block scales), into
    buffers allocated once and reused: the returned tensor is overwritten by the next call."""

    def __init__(self, packed: torch.Tensor, code: torch.Tensor, scales: torch.Tensor, out_features: int,
                 in_features: int, blocksize: int, dtype: torch.dtype, block_weights: int):
        self.out_features, self.in_features, self.blocksize = out_features, in_features, blocksize
        rows_per_whole_blocks = blocksize // math.gcd(in_features, blocksize)
        rows = block_weights // max(in_features, 1) // rows_per_whole_blocks * rows_per_whole_blocks
        self.row_step = max(1, min(out_features, max(rows_per_whole_blocks, rows)))
        n_bytes = (self.row_step * in_features + 1) // 2
        self._bytes = packed_bytes(packed)
        self._table = byte_pair_code(code)
        self._scales = scales.float()
        self._index = torch.empty(n_bytes, dtype=torch.int32, device=packed.device)
        self._pairs = torch.empty(n_bytes, dtype=torch.int64, device=packed.device)
        self._rounded = None if dtype == torch.float32 else torch.empty(2 * n_bytes, dtype=dtype, device=packed.device)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        first, last = start * self.in_features, stop * self.in_features
        first_byte, end_byte = first // 2, (last + 1) // 2
        index = self._index[: end_byte - first_byte]
        index.copy_(self._bytes[first_byte:end_byte])
        pairs = torch.index_select(self._table, 0, index, out=self._pairs[: end_byte - first_byte])
        values = pairs.view(torch.float32)[: last - first]
        _scale_blocks_(values, self._scales[first // self.blocksize : -(-last // self.blocksize)], self.blocksize)
        if self._rounded is not None:  # round to dtype in place: w.to(dtype).float()
            values.copy_(self._rounded[: last - first].copy_(values))
        return values.view(stop - start, self.in_features)


def linear_4bit_rows(
    x: torch.Tensor,
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    out_features: int,
    in_features: int,
    blocksize: int,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``x @ W^T + bias`` for a 2-D ``x`` of a few rows, as one reduction over the decoded weight:
    ``sum_k round(x[m, k]) * round(code[nibble] * absmax[block])`` in float32, the bias added, one
    rounding to ``dtype`` (the ``linear_fp32_accumulate`` contract, summed in another order).

    Written so that Inductor fuses the decoding into the reduction, which then reads the packed bytes
    and never writes the weight; eagerly it would materialise ``[m, out, in]``, so the linear op uses it
    only under ``torch.compile``. Needs ``in_features % blocksize == 0`` (no block crosses a row)."""
    n_blocks = in_features // blocksize
    codes = packed_bytes(packed).view(out_features, n_blocks, blocksize // 2).int()
    code = code.float()
    values = torch.stack([code[codes >> 4], code[codes & 0xF]], dim=-1).view(out_features, n_blocks, blocksize)
    weight = (values * absmax.float().view(out_features, n_blocks, 1)).to(dtype).float()
    rows = x.to(dtype).float().view(-1, 1, n_blocks, blocksize)
    out = (rows * weight).sum(dim=(-1, -2))
    if bias is not None:
        out = out + bias.to(dtype).float()
    return out.to(dtype)
