"""Code books of the bitsandbytes 4-bit and 8-bit blockwise formats, as exact float32 values.

Every value here is byte-identical to bitsandbytes 0.50 (``bitsandbytes.functional.get_4bit_type`` and
``create_dynamic_map(signed=True)``); ``tests/test_formats_bnb.py`` checks that against the library.

A 4-bit code is an index 0..15 into a 16-entry code book; a block's values are ``code[index] * absmax``.
"""

from __future__ import annotations

import functools

import torch

# NF4: quantiles of N(0, 1) normalised to [-1, 1], index 0..15 (sorted ascending, so index == rank).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (e2m1 flavour of bitsandbytes): bit 3 is the sign, bits 0..2 index these magnitudes, all / 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# Code 8 is +0.0, not -0.0: bitsandbytes writes it as the integer literal -0.
FP4_CODE = tuple(m / 12.0 for m in _FP4_MAGNITUDES) + tuple(-(m / 12.0) if m else 0.0 for m in _FP4_MAGNITUDES)

# The FP4 code book is not sorted. Quantization bucketizes against the sorted values; this maps a
# sorted rank back to its 4-bit code. The two zeros (code 0 = +0.0, code 8 = -0.0) tie: rank 7 is
# code 0 and rank 8 is code 8, as bitsandbytes' CPU quantizer has them (its ``argsort`` order), so an
# input of exactly 0 gets code 0 and a tiny positive input (0 < x <= 1/384) gets code 8.
FP4_RANK_TO_CODE = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

QUANT_TYPES = ("nf4", "fp4")


def _signed_dynamic_map() -> tuple[float, ...]:
    """The signed 8-bit "dynamic" map (Dettmers 2015) bitsandbytes uses for double quantization.

    For exponent e = 0..6 it holds the midpoints of ``linspace(0.1, 1, 2**e + 1)`` (float32) scaled
    by 10**(e - 6), with both signs, plus 0 and 1: 256 values, sorted ascending.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist()
        values += (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    return tuple(sorted(values))


DYNAMIC_CODE = _signed_dynamic_map()
DOUBLE_QUANT_BLOCKSIZE = 256  # blocks of 4-bit absmax values per nested (8-bit) absmax


@functools.cache
def _cached(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 code values of ``quant_type`` ("nf4" or "fp4"), indexed by 4-bit code."""
    if quant_type == "nf4":
        return _cached(NF4_CODE, torch.device(device))
    if quant_type == "fp4":
        return _cached(FP4_CODE, torch.device(device))
    raise ValueError(f"unknown 4-bit quant_type {quant_type!r}; expected one of {QUANT_TYPES}")


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 float32 values of the signed dynamic map, indexed by 8-bit code."""
    return _cached(DYNAMIC_CODE, torch.device(device))
