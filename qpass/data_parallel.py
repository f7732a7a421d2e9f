"""Data-parallel training (``torch.nn.parallel.DistributedDataParallel``) of a quantized model.

A ``QuantizedLinear`` holds its packed codes as a frozen parameter and its scales as buffers. DDP
broadcasts every parameter from rank 0 when it starts, and every buffer before every forward
(``broadcast_buffers=True``, its default and the HF Trainer's): for QLoRA that is the whole quantized
model once, then all its scales at every training step (1.6 MiB for SmolLM2-135M in NF4, 0.6 MiB in
int8). The quantized tensors never change, so qpass asks DDP to leave them out: DDP reads the names of
the tensors to ignore from the ``_ddp_params_and_buffers_to_ignore`` attribute of the module it wraps
(what ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` sets), once, when it is
built.

The attribute qpass sets is computed when DDP reads it, so it always names the quantized tensors the
model holds at that moment: none after ``qpass.dequantize`` (whose weights then train and must be
synchronised), and the ones under PEFT's LoRA wrappers once ``get_peft_model`` has wrapped the layers.
Every other buffer (rotary tables, BatchNorm statistics) is still broadcast as DDP would. Each process
must hold the same quantized weights, as it does when every rank loads or quantizes the same checkpoint.

FSDP2 (``fully_shard``) needs nothing from qpass on torch >= 2.12: it shards the packed weights, which
are parameters, and leaves the scales (buffers) whole on every rank. torch 2.11's ``fully_shard`` makes
every parameter it shards require grad, which an integer tensor cannot ("only Tensors of floating point
dtype can require gradients"); there, pass ``ignored_params=quantized_parameters(model)`` and every
rank holds the whole quantized model, as DDP does.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from torch import nn

from .modules import QuantizedLinear

DDP_IGNORE_ATTRIBUTE = "_ddp_params_and_buffers_to_ignore"

# A PeftModel holds the model it wraps at base_model.model and forwards attributes it lacks to it, so
# DDP wrapping a PeftModel built by PEFT itself (trl's peft_config=...) reads this model's attribute:
# the names must also be given as they are under that prefix.
PEFT_MODEL_PREFIX = "base_model.model."


def quantized_tensor_names(model: nn.Module) -> list[str]:
    """Names, relative to ``model``, of the quantized tensors of its ``QuantizedLinear`` layers
    (``"model.layers.0.mlp.up_proj.weight"``, ``"...absmax"``, ...). A code book that layers share is
    named under each of them; ``model.named_buffers()`` gives it under the first only."""
    return [f"{prefix}{'.' if prefix else ''}{name}"
            for prefix, layer in model.named_modules() if isinstance(layer, QuantizedLinear)
            for name, tensor in layer.quantized_tensors.items() if tensor is not None]


def quantized_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The packed weights of ``model``'s ``QuantizedLinear`` layers that are parameters (integer codes;
    codes in a float ``quant_storage`` are buffers): what FSDP2 shards, and what to give ``fully_shard``
    as ``ignored_params`` on torch 2.11."""
    return {layer.packed_weight_parameter for layer in model.modules()
            if isinstance(layer, QuantizedLinear) and layer.packed_weight_parameter is not None}


class QuantizedTensorsToIgnore:
    """The value of a model's ``_ddp_params_and_buffers_to_ignore``: iterating gives the names of the
    quantized tensors the model holds now (``quantized_tensor_names``, also under PEFT's prefix), plus
    any names that were set there before (``also``). Holds the model weakly: no reference cycle keeps a
    deleted model's memory alive. Copying or pickling the model keeps it pointing at the copy."""

    def __init__(self, model: nn.Module | None, also: tuple[str, ...] = ()):
        self._model = weakref.ref(model) if model is not None else _no_model  # None: copied after the model died
        self.also = tuple(also)

    def __iter__(self) -> Iterator[str]:
        model = self._model()
        names = quantized_tensor_names(model) if model is not None else []
        return iter([*self.also, *names, *(PEFT_MODEL_PREFIX + name for name in names)])

    def __deepcopy__(self, memo: dict) -> QuantizedTensorsToIgnore:
        model = self._model()  # copying the model puts its copy in memo before copying its attributes
        return QuantizedTensorsToIgnore(memo.get(id(model), model), self.also)

    def __reduce__(self):
        return QuantizedTensorsToIgnore, (self._model(), self.also)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)})"


def _no_model() -> None:
    return None


def ignore_quantized_tensors_in_ddp(model: nn.Module) -> nn.Module:
    """Make DDP leave ``model``'s quantized tensors out of its buffer broadcasts when it wraps ``model``;
    returns ``model``. ``qpass.quantize``, ``qpass.from_pretrained`` and loading through transformers with
    a ``QPassConfig`` call it on the model they return; call it yourself on a module you wrap around the
    model (other than a PeftModel) before handing that module to DDP. Names already set there stay."""
    current = model.__dict__.get(DDP_IGNORE_ATTRIBUTE)
    if isinstance(current, QuantizedTensorsToIgnore) and current._model() is model:
        return model
    also = current.also if isinstance(current, QuantizedTensorsToIgnore) else tuple(current or ())
    setattr(model, DDP_IGNORE_ATTRIBUTE, QuantizedTensorsToIgnore(model, also))
    return model
