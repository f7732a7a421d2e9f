"""Graph passes over ``torch.export`` programs (installed as ``qpass.passes``)."""

from .linear_patterns import LinearMatch, find_linear_weights
from .quantize_linears import QuantizedLinearReport, quantize_exported_program

__all__ = ["LinearMatch", "QuantizedLinearReport", "find_linear_weights", "quantize_exported_program"]
