"""Module front-end: replace the linear layers of an ``nn.Module`` by ``QuantizedLinear`` in place, and
back (``dequantize_module``)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

from .config import QPassConfig, QuantConfig
from .data_parallel import ignore_quantized_tensors_in_ddp
from .formats import quantize_layer
from .fused_experts import warn_unquantized_experts
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
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return as_out_in(module, module.weight)
    return None


def as_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight``, laid out as ``module``'s own weight is (in its state dict and in a full-precision
    checkpoint), as ``[out, in]``: a view, transposed for transformers' ``Conv1D``, which holds
    ``[in, out]``, and for a ``QuantizedLinear`` that replaced one."""
    conv1d = module.from_conv1d if isinstance(module, QuantizedLinear) else not isinstance(module, nn.Linear)
    return weight.t() if conv1d else weight


# torch modules that read a child linear layer's weight themselves rather than calling the layer:
# nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward (and its fused fast
# path); nn.TransformerEncoderLayer (and nn.TransformerEncoder, through its first layer) hands linear1's
# and linear2's to one fused kernel in inference. A packed weight there would fail, so these layers stay
# in full precision; the graph front-end sees their aten.linear calls and quantizes them.
_WEIGHTS_READ_BY_OWNER = {nn.MultiheadAttention: ("out_proj",), nn.TransformerEncoderLayer: ("linear1", "linear2")}


def _layers_left_out(model: nn.Module) -> dict[int, str]:
    """``{id(layer): why}`` for the linear layers of ``model`` no plan may quantize (see ``linear_layers``)."""
    read_by_owner = "{} reads its weight itself (quantizing the exported program quantizes it)"
    left_out = {id(getattr(owner, name, None)): read_by_owner.format(type(owner).__name__)
                for owner in model.modules() for owner_type, names in _WEIGHTS_READ_BY_OWNER.items()
                if isinstance(owner, owner_type) for name in names if getattr(owner, name, None) is not None}
    tied = embedding_weight_ids(model)
    left_out.update((id(module), "its weight is an input embedding's") for module in model.modules()
                    if linear_weight(module) is not None and id(module.weight) in tied)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tie = getattr(text_config, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings")
    tied_output = model.get_output_embeddings() if tie else None
    if tied_output is not None:
        left_out[id(tied_output)] = "the config ties this output layer to the input embedding"
    return left_out


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(name, layer, [out, in] weight)`` of every linear layer a plan may quantize, in module order:
    all but those whose weight is an input embedding's, a transformers model's output layer while
    its config ties it to the input embedding (a model just built, before ``tie_weights()``), and the
    layers whose torch owner reads their weight itself (``nn.MultiheadAttention.out_proj``,
    ``nn.TransformerEncoderLayer.linear1``/``linear2``: ``_WEIGHTS_READ_BY_OWNER``)."""
    left_out = _layers_left_out(model)
    return [(name, module, weight) for name, module in model.named_modules()
            if (weight := linear_weight(module)) is not None and id(module) not in left_out]


def warn_unmatched_overrides(model: nn.Module, plan: QPassConfig) -> None:
    """``QPassConfig.warn_unmatched_overrides`` for ``model``: its linear layers, those already quantized
    among them, and why ``linear_layers`` leaves the others out."""
    if not plan.overrides:
        return
    left_out = _layers_left_out(model)
    layers = {name: None if isinstance(module, QuantizedLinear) else left_out.get(id(module))
              for name, module in model.named_modules()
              if isinstance(module, QuantizedLinear) or linear_weight(module) is not None}
    plan.warn_unmatched_overrides(layers, type(model).__name__)


def plan_for_model(model: nn.Module, plan: QPassConfig) -> QPassConfig:
    """``plan`` with its skip list resolved for ``model`` (``QPassConfig.for_model``), after warning of
    what it will not quantize: overrides that match no layer (``warn_unmatched_overrides``) and fused
    mixture-of-experts weights, which no format quantizes (``warn_unquantized_experts``)."""
    plan = plan.for_model(model)
    warn_unmatched_overrides(model, plan)
    warn_unquantized_experts(model.named_parameters(), type(model).__name__)
    return plan


def selected_linears(model: nn.Module, plan: QPassConfig, resolve: bool = True
                     ) -> list[tuple[str, nn.Module, torch.Tensor, QuantConfig]]:
    """``(name, layer, [out, in] weight, format config)`` of each linear layer ``plan`` quantizes in
    ``model`` (``linear_layers``), the plan resolved for the model first (``plan_for_model``) unless
    ``resolve`` is False: a checkpoint's ``quantization_config`` lists the layers it holds quantized,
    and is read as it is."""
    if resolve:
        plan = plan_for_model(model, plan)
    return [(name, module, weight, config) for name, module, weight in linear_layers(model)
            if (config := plan.config_for(name)) is not None]


def quantize_module(model: nn.Module, plan: QPassConfig) -> nn.Module:
    """Quantize every linear layer the plan selects, one at a time, freeing each original weight.

    Returns ``model``, or the new ``QuantizedLinear`` when ``model`` is itself a linear layer.

    A model whose parameters are all on the meta device (built under ``torch.device("meta")``) becomes
    an empty skeleton: each selected layer a ``QuantizedLinear`` holding meta placeholders of its
    tensors' shapes and dtypes, for ``model.load_state_dict(state_dict, assign=True)`` to fill with
    the state dict of the same model quantized with the same plan (gpt-fast's way of loading).

    DDP is told to leave the quantized tensors out of its buffer broadcasts (``qpass.data_parallel``).
    """
    skeleton = all(p.device.type == "meta" for p in model.parameters())
    for name, module, weight, config in selected_linears(model, plan):
        layout, tensors = quantize_layer(weight, config, name or type(module).__name__, allow_meta=skeleton)
        bias = module.bias if isinstance(module.bias, nn.Parameter) else None
        quantized = QuantizedLinear.replacing(module, layout, tensors, bias, name)
        if not name:  # the model is itself a linear layer
            return quantized
        set_submodule(model, name, quantized)
    return ignore_quantized_tensors_in_ddp(model)


def dequantize_module(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantizedLinear`` by the full-precision layer it stands for, one at a time: an
    ``nn.Linear`` (a transformers ``Conv1D`` where the original was one) whose weight is the dequantized
    weight, bit for bit ``QuantizedLinear.dequantize(dtype)``, on the quantized weight's device.

    ``dtype`` defaults to the dtype of most of the model's other floating-point parameters (embeddings,
    norms: the dtype the layers' inputs arrive in), else each layer's compute dtype. Dequantizing does
    not make the weight trainable (``requires_grad=False``, as the quantized one was); a bias is kept,
    cast to ``dtype`` if it differs. An accelerate hook on a layer moves to its replacement.

    Returns ``model``, or the new layer when ``model`` is itself a ``QuantizedLinear``.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, layer in layers:  # checked before any layer changes: a refused model is left as it was
        if layer.weight.device.type == "meta":
            raise ValueError(f"layer {name or type(layer).__name__!r}: its quantized weight is on the meta device "
                             "(not loaded, or offloaded); load the model onto a device before dequantizing")
    if dtype is None:
        dtype = _unquantized_parameter_dtype(model)
    for name, layer in layers:
        full = _full_precision_layer(layer, dtype or layer.layout.config.compute_dtype)
        if not name:
            return full
        set_submodule(model, name, full)
    return model


def _unquantized_parameter_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype holding most elements of the parameters outside ``QuantizedLinear`` layers."""
    return majority_floating_dtype(
        param for module in model.modules() if not isinstance(module, QuantizedLinear)
        for param in module.parameters(recurse=False))


def majority_floating_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The floating dtype holding most elements of ``tensors`` (None if none is floating): the dtype
    a dequantized weight gets by default, in both front-ends."""
    elements: dict[torch.dtype, int] = {}
    for tensor in tensors:
        if tensor.is_floating_point():
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
    return max(elements, key=elements.get) if elements else None


def _full_precision_layer(layer: QuantizedLinear, dtype: torch.dtype) -> nn.Module:
    weight = layer.dequantize(dtype)
    has_bias = layer.bias is not None
    with torch.device("meta"):  # the new layer's own weights are placeholders, replaced below
        if layer.from_conv1d:  # transformers' Conv1D(nf=out, nx=in) holds the weight [in, out]
            full = _conv1d_type()(layer.out_features, layer.in_features)
            weight = weight.t().contiguous()
        else:
            full = nn.Linear(layer.in_features, layer.out_features, bias=has_bias)
    full.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        bias = layer.bias
        if bias.dtype != dtype:
            bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
        full.bias = bias
    elif layer.from_conv1d:  # Conv1D always adds a bias; left as is, its meta placeholder would stay
        full.bias = nn.Parameter(weight.new_zeros(layer.out_features), requires_grad=False)
    hook = getattr(layer, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        remove_hook_from_module(layer)
        add_hook_to_module(full, hook)
    return full


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
