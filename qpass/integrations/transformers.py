"""``AutoModelForCausalLM.from_pretrained(path, quantization_config=qpass.QPassConfig("nf4"))``.

transformers finds a quantizer by the config's ``quant_method``; ``QPassConfig.quant_method`` registers
``QPassHfQuantizer`` under "qpass" on first access (so ``import qpass`` never imports transformers).
transformers loads the full-precision weights and the quantizer then runs ``qpass.quantize`` over the
model. To quantize tensor by tensor while reading (lower peak memory), or to load a checkpoint that
qpass saved, use ``qpass.from_pretrained``; to save, ``qpass.save_pretrained``.
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

QUANT_METHOD = "qpass"


class QPassHfQuantizer(HfQuantizer):
    """Quantizes the linear layers with qpass once transformers has loaded the weights."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            raise ValueError("this checkpoint was saved by qpass: load it with qpass.from_pretrained(path)")

    def _process_model_before_weight_loading(self, model, **kwargs):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..api import quantize

        return quantize(model, self.quantization_config)

    def is_serializable(self):
        # model.save_pretrained would write qpass' in-memory names; qpass.save_pretrained writes the
        # bitsandbytes layout.
        return False

    @property
    def is_trainable(self) -> bool:
        return True  # adapters train through the quantized layers (autograd to the input)


def register() -> None:
    """Make transformers' quantizer lookup find qpass (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QPassHfQuantizer)
