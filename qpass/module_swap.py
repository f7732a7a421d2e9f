"""Module front-end: replace the linear layers of an ``nn.Module`` by ``QuantizedLinear`` in place."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .config import QPassConfig
from .formats import quantize_layer
from .modules import QuantizedLinear


def _conv1d_type() -> type | None:
    # transformers' Conv1D ([in, out] weight, y = x @ W + b). A model can only hold one if transformers
    # is already imported, so this never imports transformers itself.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(pytorch_utils, "Conv1D", None)


def embedding_weight_ids(model: nn.Module) -> set[int]:
    """ids of the input-embedding weights: a linear layer sharing one is tied to it and stays as is."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``[out, in]`` weight of an ``nn.Linear`` or ``Conv1D``; None for any other module."""
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return module.weight
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.t()
    return None


def quantize_module(model: nn.Module, plan: QPassConfig) -> nn.Module:
    """Quantize every linear layer the plan selects, one at a time, freeing each original weight.

    Returns ``model``, or the new ``QuantizedLinear`` when ``model`` is itself a linear layer.
    """
    tied = embedding_weight_ids(model)
    for name, module in list(model.named_modules()):
        weight = linear_weight(module)
        if weight is None or id(module.weight) in tied:
            continue
        config = plan.config_for(name)
        if config is None:
            continue
        layout, tensors = quantize_layer(weight, config, name or type(module).__name__)
        bias = module.bias if isinstance(module.bias, nn.Parameter) else None
        quantized = QuantizedLinear(layout, tensors, bias, from_conv1d=not isinstance(module, nn.Linear))
        if not name:  # the model is itself a linear layer
            return quantized
        set_submodule(model, name, quantized)
    return model


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
