"""NF4 / FP4 blockwise 4-bit weights with optional double quantization (bitsandbytes ``Linear4bit``).

Tensors of a quantized ``[out, in]`` weight (n = out * in), exactly as bitsandbytes 0.50 stores them:

* ``weight``: packed codes, uint8 ``[(n + 1) // 2, 1]``, element 2i in the high nibble of byte i; with
  ``quant_storage`` bf16/fp16/fp32 the same bytes viewed as that dtype (``[n // (2 * itemsize), 1]``).
* ``quant_map``: the 16-value float32 code book (NF4 or FP4), indexed by 4-bit code.
* ``absmax``: float32 ``[ceil(n / blocksize)]``; with double quantization uint8 codes of the same
  shape, plus ``nested_absmax`` float32 ``[ceil(n_blocks / 256)]``, ``nested_quant_map`` (the 256-value
  signed dynamic map, float32) and ``offset`` (float32 scalar).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch

from ..config import FORMATS, Weight4bitConfig
from ..kernels.codebooks import DOUBLE_QUANT_BLOCKSIZE, code_4bit, dynamic_code
from .base import Layout, LinearCall, register_format, tensor_value


@dataclasses.dataclass(frozen=True)
class Layout4bit(Layout):
    out_features: int
    in_features: int
    config: Weight4bitConfig
    # dtype of the weight before quantization (bitsandbytes' quant_state.dtype)
    source_dtype: torch.dtype = torch.float32

    tensor_names: ClassVar[tuple[str, ...]] = (
        "weight", "quant_map", "absmax", "nested_absmax", "nested_quant_map", "offset")
    shared_tensor_names: ClassVar[tuple[str, ...]] = ("quant_map", "nested_quant_map")
    linear_op_name: ClassVar[str] = "linear_4bit"

    def linear_call(self, x, tensors, bias):
        c = self.config
        args = (x, *(tensors[name] for name in self.tensor_names), bias)
        args += (self.out_features, self.in_features, c.blocksize, c.quant_type, c.compute_dtype)
        return self.linear_op(), args

    @classmethod
    def parse_linear_args(cls, args):
        x, *quantized, bias, out_features, in_features, blocksize, quant_type, compute_dtype = args
        tensors = dict(zip(cls.tensor_names, quantized, strict=True))
        config = FORMATS[quant_type](  # a 4-bit format's name is its quant_type
            blocksize=blocksize, double_quant=tensors["nested_absmax"] is not None, compute_dtype=compute_dtype,
            quant_storage=tensor_value(tensors["weight"]).dtype)
        return LinearCall(cls(out_features, in_features, config), x, tensors, bias)

    def nbytes(self) -> int:
        n = self.out_features * self.in_features
        n_blocks = -(-n // self.config.blocksize)
        if self.config.double_quant:  # uint8 codes, float32 nested absmax per 256 blocks, float32 offset
            return (n + 1) // 2 + n_blocks + 4 * -(-n_blocks // DOUBLE_QUANT_BLOCKSIZE) + 4
        return (n + 1) // 2 + 4 * n_blocks

    def shared_nbytes(self) -> dict[str, int]:
        books = {f"quant_map/{self.config.quant_type}": 4 * 16}
        if self.config.double_quant:
            books["nested_quant_map"] = 4 * 256
        return books

    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        c = self.config
        dtypes = {"weight": c.quant_storage, "quant_map": torch.float32,
                  "absmax": torch.uint8 if c.double_quant else torch.float32}
        if c.double_quant:
            dtypes.update(nested_absmax=torch.float32, nested_quant_map=torch.float32, offset=torch.float32)
        return dtypes

    def dequantize(self, tensors: Mapping[str, torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        c = self.config
        return torch.ops.qpass.dequantize_4bit(
            *(tensors[name] for name in self.tensor_names), [self.out_features, self.in_features], c.blocksize, dtype
        )


@register_format(Weight4bitConfig, Layout4bit)
def quantize_4bit(weight: torch.Tensor, config: Weight4bitConfig):
    itemsize = torch.empty(0, dtype=config.quant_storage).element_size()
    n_bytes = (weight.numel() + 1) // 2
    if n_bytes % itemsize:
        raise ValueError(
            f"quant_storage={config.quant_storage} needs the packed size ({n_bytes} bytes for {tuple(weight.shape)}) "
            f"to be a multiple of {itemsize} bytes; use quant_storage=torch.uint8 for this layer"
        )
    packed, absmax = torch.ops.qpass.quantize_4bit(weight, config.blocksize, config.quant_type)
    if config.quant_storage != torch.uint8:
        packed = packed.reshape(-1).view(config.quant_storage).unsqueeze(1)
    tensors: dict[str, torch.Tensor | None] = dict.fromkeys(Layout4bit.tensor_names)
    tensors["weight"] = packed
    tensors["quant_map"] = code_4bit(config.quant_type, weight.device)
    if config.double_quant:
        code = dynamic_code(weight.device)
        offset = absmax.mean()
        tensors["absmax"], tensors["nested_absmax"] = torch.ops.qpass.quantize_blockwise_8bit(
            absmax - offset, code, DOUBLE_QUANT_BLOCKSIZE
        )
        tensors["nested_quant_map"] = code
        tensors["offset"] = offset
    else:
        tensors["absmax"] = absmax
    out_features, in_features = weight.shape
    return Layout4bit(out_features, in_features, config, weight.dtype), tensors
