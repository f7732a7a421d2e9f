"""``qpass.save_pretrained``: a quantized transformers model as a transformers + bitsandbytes checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..module_swap import linear_weight
from ..modules import QuantizedLinear
from .bnb_layout import layer_to_bnb, quantization_config
from .errors import CheckpointError
from .safetensors_io import atomic_folder, write_tensors


def layer_configs(model: nn.Module) -> tuple[dict[str, QuantConfig], list[str]]:
    """(config of each ``QuantizedLinear`` by name, names of the linear layers left in full precision)."""
    configs, skipped = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            configs[name] = module.layout.config
        elif name and linear_weight(module) is not None:
            skipped.append(name)
    return configs, skipped


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by key: the quantized layers' in bitsandbytes' layout, the rest as they are."""
    tensors: dict[str, torch.Tensor] = {}
    owned = []
    seen_storages: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            for suffix, tensor in layer_to_bnb(module.layout, module.quantized_tensors).items():
                storage = tensor.untyped_storage().data_ptr()
                # code books are one tensor shared by every layer in memory, one copy per layer on disk
                tensors[f"{name}.{suffix}"] = tensor.clone() if storage in seen_storages else tensor
                seen_storages.add(storage)
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias
            owned.append(name + ".")
    for key, tensor in model.state_dict().items():
        if key.startswith(tuple(owned)):
            continue
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:  # a tied weight (lm_head = embed_tokens): stored once
            continue
        seen_storages.add(storage)
        tensors[key] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def keyed_as_transformers_saves(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``checkpoint_tensors`` under the keys transformers' own ``save_pretrained`` writes, which undoes
    (transformers >= 5, ``revert_weight_conversion``) the conversions it applies while loading: a
    mixture-of-experts model's fused experts (``mlp.experts.gate_up_proj``) go back to one tensor per
    expert (``block_sparse_moe.experts.0.w1.weight``), as the model's original checkpoints and
    transformers 4 hold them. Every other model's keys stay as they are. (``model.save_pretrained``
    applies it after ``get_state_dict_and_metadata`` itself.)"""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 saves every tensor under its own name
        return tensors
    return {k: v.contiguous() for k, v in revert_weight_conversion(model, tensors).items()}


def record_quantization_config(model: nn.Module) -> None:
    """Set ``model.config.quantization_config`` to what the checkpoint's ``config.json`` says: made from
    the model's layers as they are now (their formats and compute dtype, ``qpass.set_compute_dtype``
    included), bitsandbytes' fields for one format (``bnb_layout.quantization_config``).
    ``model`` is a transformers model with at least one qpass-quantized layer."""
    configs, skipped = layer_configs(model)
    model.config.quantization_config = quantization_config(configs, skipped)


def write_configs(model: nn.Module, folder: Path) -> None:
    """``config.json`` with the checkpoint's ``quantization_config`` (``record_quantization_config``),
    and ``generation_config.json``."""
    record_quantization_config(model)
    model.config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)


def save_pretrained(model: nn.Module, save_directory: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` (a transformers model quantized by qpass) to ``save_directory``: safetensors
    weights with bitsandbytes' keys (the rest under the keys transformers writes:
    ``keyed_as_transformers_saves``), ``config.json`` with its ``quantization_config``, the generation
    config. The folder appears complete or not at all."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise CheckpointError("save_pretrained needs a transformers model (with a .config); "
                              f"got {type(model).__name__}")
    if not layer_configs(model)[0]:
        raise CheckpointError("the model has no qpass-quantized layer; quantize it first (qpass.quantize) or use "
                              "the model's own save_pretrained")
    target = Path(save_directory)
    with atomic_folder(target) as staging:
        write_tensors(staging, keyed_as_transformers_saves(model, checkpoint_tensors(model)), max_shard_size)
        write_configs(model, staging)
    return target
