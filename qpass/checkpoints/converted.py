"""Loading the checkpoints whose tensors transformers (>= 5) renames or merges while loading them: a
mixture-of-experts checkpoint's per-expert tensors (``block_sparse_moe.experts.0.w1.weight``), which the
model holds fused (``mlp.experts.gate_up_proj``), or a vision-language model's ``language_model.model.*``
(``model.language_model.*`` in the model). ``qpass.from_pretrained`` hands them to transformers' own
loader with qpass' quantizer, so that those conversions stay transformers'; ``save.keyed_as_transformers_saves``
is the way back.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..config import QPASS_QUANT_METHOD, QPassConfig, config_to_dict
from ..module_swap import linear_layers
from .bnb_layout import STORED_SUFFIXES, is_quantized_layer, layer_from_bnb
from .errors import CheckpointError
from .save import keyed_as_transformers_saves


def keys_transformers_converts(model: nn.Module, keys) -> list[str]:
    """The checkpoint keys that name no tensor of ``model`` (nor of one of its linear layers, quantized or
    not) where transformers has a conversion mapping for the model (transformers >= 5): tensors it renames
    or merges while loading, as a mixture-of-experts checkpoint holds one tensor per expert
    (``block_sparse_moe.experts.0.w1.weight``) for the model's fused parameter (``mlp.experts.gate_up_proj``).
    Empty for every other model, where such a key is an error (``load._assign``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers 4 loads tensors by their own names
        return []
    if not get_model_conversion_mapping(model, add_legacy=False):
        return []
    own = set(model.state_dict())
    layers = tuple(f"{name}." for name, _, _ in linear_layers(model))
    return [key for key in keys if key not in own and not key.startswith(layers)]


# A key under one expert of a list of experts (``mlp.experts.3.``, ``block_sparse_moe.experts.3.``): the
# layout transformers 4 and the original checkpoints use, which transformers 5 merges into fused experts.
_ONE_EXPERT = re.compile(r"(^|\.)\w*experts\.\d+\.")


def load_through_transformers(path: Path, model_class, config, plan: QPassConfig | None, model: nn.Module, reader,
                               converted: list[str], bnb_settings, dtype: torch.dtype | None,
                               device: torch.device, progress: bool) -> nn.Module:
    """``model_class.from_pretrained`` of the checkpoint, for one whose tensors transformers converts while
    loading (``keys_transformers_converts``; ``model`` is the empty model built from its config): its
    loader, with qpass' quantizer (``integrations.transformers``) quantizing while loading, as
    ``from_pretrained(path, quantization_config=plan)`` through transformers does, or reading the stored
    quantized layers. A bitsandbytes checkpoint's config is replaced by qpass' listing of each quantized
    layer's format, read from its stored tensors, so that transformers reads it with qpass' quantizer
    rather than bitsandbytes'."""
    import transformers

    quantized_experts = [key for key in converted if key.endswith(STORED_SUFFIXES[:-1]) and _ONE_EXPERT.search(key)]
    if quantized_experts:
        raise CheckpointError(
            f"{path}: the checkpoint holds quantized tensors of single experts ({quantized_experts[0]!r}), which "
            f"transformers {transformers.__version__} merges into the fused experts of {type(model).__name__}, and "
            "no quantized layer can hold those. It was saved with transformers 4 and bitsandbytes' per-expert "
            "layers: load it with transformers 4, or quantize the full-precision checkpoint")
    if bnb_settings is not None:  # a bitsandbytes checkpoint, one format
        layers = {}
        for name, _, _ in linear_layers(model):
            stored_name = _name_as_saved(model, name)
            suffixes = reader.suffixes_under(stored_name)
            if is_quantized_layer(suffixes):
                layout, _ = layer_from_bnb(stored_name, lambda suffix: reader.get(f"{stored_name}.{suffix}"), suffixes,
                                           *bnb_settings)
                layers[name] = config_to_dict(layout.config)
        config.quantization_config = {"quant_method": QPASS_QUANT_METHOD, "layers": layers}
    from transformers.utils import logging as transformers_logging

    options = {"config": config, "dtype": dtype or "auto", "device_map": {"": device}}
    if plan is not None:
        options["quantization_config"] = plan
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    if not progress:  # transformers' own loading bar, shown by default
        transformers_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(path, **options).eval()
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()


def _name_as_saved(model: nn.Module, layer: str) -> str:
    """The name transformers' ``save_pretrained`` writes linear layer ``layer`` of ``model`` under: its own,
    or another where transformers renames it while loading (a vision-language model's
    ``model.language_model.layers.0...`` is ``language_model.model.layers.0...`` in its checkpoints)."""
    (key,) = keyed_as_transformers_saves(model, {f"{layer}.weight": torch.empty(0)})
    return key.removesuffix(".weight")
