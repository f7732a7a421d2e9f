"""What every quantized-weight format provides, and the registry from config type to format.

A format turns a full-precision weight ``[out_features, in_features]`` into a *layout* (a frozen,
hashable description: shapes and options) plus a dict of tensors, and knows how to call its
``torch.ops.qpass`` linear op on them. Both front-ends (module swap and the ``torch.export`` graph
pass) go through ``quantize_weight`` and ``Layout.linear_call``, so they build identical ops.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import torch

from ..config import QuantConfig
from ..errors import QuantizationError, check_weight

T = TypeVar("T")  # a Tensor at run time, an fx Node inside a graph pass


class Layout(abc.ABC):
    """Static description of one quantized weight. Subclasses are frozen dataclasses."""

    out_features: int
    in_features: int
    config: QuantConfig
    # Names of the quantized tensors, in the order the linear op takes them. A name may map to None
    # (an optional op input that this layout does not use).
    tensor_names: ClassVar[tuple[str, ...]]

    @abc.abstractmethod
    def linear_call(self, x: T, tensors: Mapping[str, T | None], bias: T | None) -> tuple[Callable, tuple]:
        """``(op, args)`` such that ``op(*args)`` is ``x @ W^T + bias``."""

    @abc.abstractmethod
    def dequantize(self, tensors: Mapping[str, torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out_features, in_features]`` in ``dtype``."""



Quantizer = Callable[[torch.Tensor, Any], tuple[Layout, dict[str, torch.Tensor | None]]]
_QUANTIZERS: dict[type, Quantizer] = {}


def register_format(config_type: type[QuantConfig]) -> Callable[[Quantizer], Quantizer]:
    """Register ``fn(weight, config) -> (layout, tensors)`` as the quantizer for ``config_type``."""

    def register(fn: Quantizer) -> Quantizer:
        _QUANTIZERS[config_type] = fn
        return fn

    return register


def quantize_weight(weight: torch.Tensor, config: QuantConfig) -> tuple[Layout, dict[str, torch.Tensor | None]]:
    """Quantize a float weight ``[out_features, in_features]`` with ``config``."""
    for cls in type(config).__mro__:
        if cls in _QUANTIZERS:
            return _QUANTIZERS[cls](weight, config)
    raise TypeError(f"no qpass format is registered for {type(config).__name__}")


def quantize_layer(weight: torch.Tensor, config: QuantConfig, layer: str) -> tuple[Layout, dict[str, torch.Tensor | None]]:
    """``quantize_weight`` for the layer named ``layer``: bad weights and impossible configs raise a
    ``QuantizationError`` that names the layer. Both front-ends quantize through this."""
    check_weight(weight, layer)
    try:
        return quantize_weight(weight.detach(), config)
    except ValueError as err:
        raise QuantizationError(f"layer {layer!r}: {err}") from err
