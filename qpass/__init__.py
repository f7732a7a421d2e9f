"""qpass: bitsandbytes-exact NF4 / FP4 / LLM.int8() quantization, the PyTorch 2 way.

    model = qpass.quantize(model, "nf4")      # or "fp4", "int8", a config, a QPassConfig
    model = torch.compile(model, fullgraph=True)
"""

from . import kernels  # noqa: F401  (registers torch.ops.qpass.*)
from .api import dequantize, export_onnx, quantize, set_compute_dtype
from .checkpoints import CheckpointError, from_pretrained, save_pretrained
from .config import FP4Config, Int8Config, NF4Config, QPassConfig, QuantConfig, Weight4bitConfig
from .errors import QuantizationError
from .estimate import Estimate, estimate
from .footprint import Footprint, footprint
from .integrations import register_with_transformers_on_import
from .modules import QuantizedLinear

register_with_transformers_on_import()

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Estimate",
    "FP4Config",
    "Footprint",
    "Int8Config",
    "NF4Config",
    "QPassConfig",
    "QuantConfig",
    "QuantizationError",
    "QuantizedLinear",
    "Weight4bitConfig",
    "dequantize",
    "estimate",
    "export_onnx",
    "footprint",
    "from_pretrained",
    "quantize",
    "save_pretrained",
    "set_compute_dtype",
]
