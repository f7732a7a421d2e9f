"""LLM.int8() weights (bitsandbytes ``Linear8bitLt``).

Tensors of a quantized ``[out, in]`` weight: ``weight`` = CB, int8 ``[out, in]`` (row-major), and
``SCB``, float32 ``[out]``, with ``W ≈ CB * SCB / 127`` (see ``qpass.kernels.reference_int8``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch

from ..config import Int8Config
from .base import Layout, LinearCall, register_format, tensor_value


@dataclasses.dataclass(frozen=True)
class LayoutInt8(Layout):
    out_features: int
    in_features: int
    config: Int8Config

    tensor_names: ClassVar[tuple[str, ...]] = ("weight", "SCB")
    linear_op_name: ClassVar[str] = "linear_int8"

    def linear_call(self, x, tensors, bias):
        c = self.config
        args = (x, tensors["weight"], tensors["SCB"], bias, float(c.threshold), c.compute_dtype)
        return self.linear_op(), args

    @classmethod
    def parse_linear_args(cls, args):
        x, weight, scb, bias, threshold, compute_dtype = args
        out_features, in_features = tensor_value(weight).shape
        config = Int8Config(threshold=threshold, compute_dtype=compute_dtype)
        return LinearCall(cls(int(out_features), int(in_features), config), x, {"weight": weight, "SCB": scb}, bias)

    def nbytes(self) -> int:
        return self.out_features * self.in_features + 4 * self.out_features  # int8 CB, float32 SCB

    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        return {"weight": torch.int8, "SCB": torch.float32}

    def dequantize(self, tensors: Mapping[str, torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.qpass.dequantize_int8(tensors["weight"], tensors["SCB"], dtype)


@register_format(Int8Config, LayoutInt8)
def quantize_int8(weight: torch.Tensor, config: Int8Config):
    cb, scb, _ = torch.ops.qpass.int8_vectorwise_quant(weight.to(torch.float16), 0.0)
    out_features, in_features = weight.shape
    return LayoutInt8(out_features, in_features, config), {"weight": cb, "SCB": scb}
