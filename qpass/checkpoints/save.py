"""``qpass.save_pretrained``: a quantized transformers model as a transformers + bitsandbytes checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..module_swap import linear_weight
from ..modules import QuantizedLinear
from .bnb_layout import layer_to_bnb, quantization_config
from .errors import CheckpointError
from .safetensors_io import atomic_folder, write_tensors


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(tensors by checkpoint key, per-layer configs, names of linear layers left in full precision)."""
    tensors: dict[str, torch.Tensor] = {}
    configs, skipped, owned = {}, [], []
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
            configs[name] = module.layout.config
            owned.append(name + ".")
        elif name and linear_weight(module) is not None:
            skipped.append(name)
    for key, tensor in model.state_dict().items():
        if key.startswith(tuple(owned)):
            continue
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:  # a tied weight (lm_head = embed_tokens): stored once
            continue
        seen_storages.add(storage)
        tensors[key] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, configs, skipped


def save_pretrained(model: nn.Module, save_directory: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` (a transformers model quantized by qpass) to ``save_directory``: safetensors
    weights with bitsandbytes' keys, ``config.json`` with its ``quantization_config``, the generation
    config. The folder appears complete or not at all."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise CheckpointError(f"save_pretrained needs a transformers model (with a .config); got {type(model).__name__}")
    tensors, configs, skipped = checkpoint_tensors(model)
    if not configs:
        raise CheckpointError("the model has no qpass-quantized layer; quantize it first (qpass.quantize) or use "
                              "the model's own save_pretrained")
    target = Path(save_directory)
    with atomic_folder(target) as staging:
        write_tensors(staging, tensors, max_shard_size)
        config.quantization_config = quantization_config(configs, skipped)
        config.save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
    return target
