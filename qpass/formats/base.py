"""What every quantized-weight format provides, and the registry from config type to format.

A format turns a full-precision weight ``[out_features, in_features]`` into a *layout* (a frozen,
hashable description: shapes and options) plus a dict of tensors, and knows how to call its
``torch.ops.qpass`` linear op on them. Both front-ends (module swap and the ``torch.export`` graph
pass) go through ``quantize_weight`` and ``Layout.linear_call``, so they build identical ops.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

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
    # Those of them that are code books: one tensor shared by every layer of the format.
    shared_tensor_names: ClassVar[tuple[str, ...]] = ()
    # The torch.ops.qpass linear op of this layout, by name (``linear_call`` calls it, and
    # ``parse_linear_call`` finds the layout by it).
    linear_op_name: ClassVar[str]

    @classmethod
    def linear_op(cls):
        """``torch.ops.qpass.<linear_op_name>.default``."""
        return getattr(torch.ops.qpass, cls.linear_op_name).default

    @abc.abstractmethod
    def linear_call(self, x: T, tensors: Mapping[str, T | None], bias: T | None) -> tuple[Callable, tuple]:
        """``(op, args)`` such that ``op(*args)`` is ``x @ W^T + bias``."""

    @classmethod
    @abc.abstractmethod
    def parse_linear_args(cls, args: tuple) -> LinearCall:
        """The inverse of ``linear_call``: the layout, input, tensors and bias of the op's ``args``."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of this layer's quantized tensors, computed from shapes alone; code books shared by
        every layer (``quant_map``, ``nested_quant_map``) are not counted."""

    def shared_nbytes(self) -> dict[str, int]:
        """The code books this layer shares with every layer of its kind: ``{name: bytes}``."""
        return {}

    @abc.abstractmethod
    def dequantize(self, tensors: Mapping[str, torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out_features, in_features]`` in ``dtype``."""

    @abc.abstractmethod
    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        """``{name: dtype}`` of each quantized tensor this layout holds (names it leaves None are absent)."""


@dataclasses.dataclass(frozen=True)
class LinearCall(Generic[T]):
    """One call of a format's linear op, taken apart (``Layout.parse_linear_args``). The layout's
    ``source_dtype``, which the op does not take, is left at its default."""

    layout: Layout
    x: T
    tensors: dict[str, T | None]
    bias: T | None


def tensor_value(value) -> torch.Tensor:
    """A tensor as it is, or the (fake) tensor an fx node stands for (its ``meta["val"]``): for the dtype
    and shape of an op argument in both front-ends."""
    return value if isinstance(value, torch.Tensor) else value.meta["val"]


Quantizer = Callable[[torch.Tensor, Any], tuple[Layout, dict[str, torch.Tensor | None]]]
_FORMATS: dict[type, tuple[type[Layout], Quantizer]] = {}
_LAYOUTS_BY_OP: dict[str, type[Layout]] = {}


def register_format(config_type: type[QuantConfig], layout_type: type[Layout]) -> Callable[[Quantizer], Quantizer]:
    """Register ``fn(weight, config) -> (layout, tensors)`` as the quantizer for ``config_type``, whose
    layouts are ``layout_type(out_features, in_features, config)``."""

    def register(fn: Quantizer) -> Quantizer:
        _FORMATS[config_type] = (layout_type, fn)
        _LAYOUTS_BY_OP[layout_type.linear_op_name] = layout_type
        return fn

    return register


def _lookup(config: QuantConfig) -> tuple[type[Layout], Quantizer]:
    for cls in type(config).__mro__:
        if cls in _FORMATS:
            return _FORMATS[cls]
    raise TypeError(f"no qpass format is registered for {type(config).__name__}")


def quantize_weight(weight: torch.Tensor, config: QuantConfig) -> tuple[Layout, dict[str, torch.Tensor | None]]:
    """Quantize a float weight ``[out_features, in_features]`` with ``config``."""
    return _lookup(config)[1](weight, config)


def parse_linear_call(op, args: tuple) -> LinearCall | None:
    """``op(*args)`` taken apart if ``op`` is a format's linear op (``torch.ops.qpass.linear_4bit.default``,
    ...), else None. ``args`` may hold tensors or fx nodes, as ``Layout.linear_call`` builds them."""
    namespace, _, rest = getattr(op, "name", lambda: "")().partition("::")
    layout_type = _LAYOUTS_BY_OP.get(rest.partition(".")[0]) if namespace == "qpass" else None
    return None if layout_type is None else layout_type.parse_linear_args(tuple(args))


def layout_for(config: QuantConfig, out_features: int, in_features: int) -> Layout:
    """The layout a ``[out_features, in_features]`` weight gets under ``config``, without quantizing."""
    return _lookup(config)[0](out_features, in_features, config)


def quantize_layer(weight: torch.Tensor, config: QuantConfig, layer: str,
                   allow_meta: bool = False) -> tuple[Layout, dict[str, torch.Tensor | None]]:
    """``quantize_weight`` for the layer named ``layer``: bad weights and impossible configs raise a
    ``QuantizationError`` that names the layer. Both front-ends quantize through this. With
    ``allow_meta``, a meta weight gives the layout and meta placeholders of its tensors."""
    check_weight(weight, layer, allow_meta)
    try:
        return quantize_weight(weight.detach(), config)
    except ValueError as err:
        raise QuantizationError(f"layer {layer!r}: {err}") from err
