"""Graph passes over ``torch.export`` programs (installed as ``qpass.passes``)."""

from .compute_dtype import set_compute_dtype_exported_program
from .dequantize_linears import dequantize_exported_program
from .linear_patterns import LinearMatch, find_linear_weights
from .program_edit import QuantizedLinearNode, quantized_linear_nodes
from .quantize_linears import PARAMETER_KEY, QuantizedLinearReport, quantize_exported_program

__all__ = ["PARAMETER_KEY", "LinearMatch", "QuantizedLinearNode", "QuantizedLinearReport",
           "dequantize_exported_program", "find_linear_weights", "quantize_exported_program",
           "quantized_linear_nodes", "set_compute_dtype_exported_program"]
