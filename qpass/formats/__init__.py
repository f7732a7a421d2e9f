"""Quantized weight formats: one module per format, registered by config type."""

from . import int8, weight4bit  # noqa: F401  (registers the formats)
from .base import Layout, LinearCall, layout_for, parse_linear_call, quantize_layer, quantize_weight, register_format
from .int8 import LayoutInt8
from .weight4bit import Layout4bit

__all__ = ["Layout", "Layout4bit", "LayoutInt8", "LinearCall", "layout_for", "parse_linear_call", "quantize_layer",
           "quantize_weight", "register_format"]
