"""``qpass.quantize``: one entry point for modules and exported programs; ``qpass.dequantize``, its inverse;
``qpass.set_compute_dtype``; ``qpass.export_onnx`` for ONNX Runtime."""

from __future__ import annotations

from typing import TypeVar, overload

import torch
from torch import nn
from torch.export import ExportedProgram

from .config import ConfigLike, QPassConfig, as_plan
from .module_swap import dequantize_module, quantize_module
from .modules import QuantizedLinear

M = TypeVar("M", bound=nn.Module)


@overload
def quantize(model: M, spec: ConfigLike | QPassConfig, **plan_options) -> M: ...
@overload
def quantize(model: ExportedProgram, spec: ConfigLike | QPassConfig, **plan_options) -> ExportedProgram: ...


def quantize(model, spec, **plan_options):
    """Quantize the linear layers of ``model`` to ``spec``.

    ``model``: an ``nn.Module`` (its ``nn.Linear`` / transformers ``Conv1D`` layers are replaced in place
    and the module is returned) or a ``torch.export.ExportedProgram`` (a new program is returned whose
    graph calls ``torch.ops.qpass`` ops). ``spec``: "nf4", "fp4", "int8", a config object
    (``NF4Config(blocksize=128)``), a ``QPassConfig``, or a transformers ``BitsAndBytesConfig``
    (``QPassConfig.from_bitsandbytes``: the layers and bytes bitsandbytes would give). ``plan_options``
    are ``QPassConfig`` fields: ``overrides={"*.self_attn.*": "int8"}``, ``skip_modules=["lm_head"]``.

    Layers already quantized are left as they are, so quantizing twice changes nothing.
    """
    plan = as_plan(spec, **plan_options)
    if isinstance(model, ExportedProgram):
        from .passes import quantize_exported_program

        return quantize_exported_program(model, plan)[0]
    if isinstance(model, nn.Module):
        return quantize_module(model, plan)
    raise TypeError(f"qpass.quantize takes an nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}")


@overload
def dequantize(model: M, dtype: torch.dtype | None = None) -> M: ...
@overload
def dequantize(model: ExportedProgram, dtype: torch.dtype | None = None) -> ExportedProgram: ...


def dequantize(model, dtype=None):
    """Replace the ``QuantizedLinear`` layers of ``model`` by full-precision ``nn.Linear`` (or transformers
    ``Conv1D``) layers holding the dequantized weights, in place; returns ``model`` (the new layer where
    ``model`` is itself a ``QuantizedLinear``). For a ``torch.export.ExportedProgram``, returns a new
    program in which each qpass linear op is ``aten.linear`` with its weight decoded into a parameter
    named as the packed one (``[out, in]``; see ``qpass.passes.dequantize_exported_program``).

    The weights are the quantized ones decoded, not the originals: quantization error stays. What it is
    for: merging LoRA adapters without re-quantizing them away (``qpass.integrations.peft``), or handing a
    model to code that needs plain layers. ``dtype`` defaults to the dtype of the model's other
    floating-point parameters (see ``module_swap.dequantize_module``). A transformers model forgets its
    quantization config too, so ``model.save_pretrained`` writes a plain checkpoint; through transformers,
    ``model.dequantize()`` does the same.
    """
    if isinstance(model, ExportedProgram):
        from .passes import dequantize_exported_program

        return dequantize_exported_program(model, dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"qpass.dequantize takes an nn.Module or a torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return model
    model = dequantize_module(model, dtype)
    _drop_quantization_config(model)
    return model


@overload
def set_compute_dtype(model: M, dtype: torch.dtype) -> M: ...
@overload
def set_compute_dtype(model: ExportedProgram, dtype: torch.dtype) -> ExportedProgram: ...


def set_compute_dtype(model, dtype):
    """Make every ``QuantizedLinear`` of ``model`` compute in ``dtype`` (bf16, fp16 or fp32), in place;
    returns ``model``. For a ``torch.export.ExportedProgram``, returns a new program whose qpass linear
    ops compute in ``dtype``. The stored bytes are unchanged, so this is lossless and ``save_pretrained`` records
    the new dtype. What it is for: a checkpoint saved with ``bnb_4bit_compute_dtype=bfloat16`` run in
    float32 (on CPUs without fast bf16, or for ONNX Runtime's CPU provider, ``qpass.export_onnx``), or
    the reverse. Call it on a module before ``torch.compile`` or export (traced graphs keep the dtype
    they saw), or on the exported program. Full-precision parameters are not cast: ``model.float()``
    does that."""
    if isinstance(model, ExportedProgram):
        from .passes import set_compute_dtype_exported_program

        return set_compute_dtype_exported_program(model, dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"qpass.set_compute_dtype takes an nn.Module or a torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            try:
                layer.set_compute_dtype_(dtype)
            except ValueError as err:
                raise ValueError(f"layer {name or type(layer).__name__!r}: {err}") from err
    return model


def export_onnx(model, args: tuple = (), f=None, **options):
    """Export a quantized ``nn.Module`` or ``ExportedProgram`` to ONNX, for ONNX Runtime: 4-bit layers as
    its ``com.microsoft.MatMulBnb4`` operator (the bitsandbytes layout as is), int8 layers as standard
    ONNX operators. Writes ``f`` if given and returns the ``torch.onnx.ONNXProgram``; ``options`` go to
    ``torch.onnx.export``. Needs ``onnxscript`` (``pip install qpass[onnx]``); details in
    ``qpass.integrations.onnx``."""
    from .integrations.onnx import export_onnx as export

    return export(model, args, f, **options)


def _drop_quantization_config(model: nn.Module) -> None:
    """A transformers model still says it is quantized (``config.quantization_config``, ``hf_quantizer``):
    ``save_pretrained`` would refuse, or write a quantized config over full-precision weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel wraps it
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(base)
    elif hasattr(getattr(base, "config", None), "quantization_config"):
        del base.config.quantization_config
