"""``qpass.estimate``: the exact size of a quantized model from its config alone (no weights)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoints.hub import CONFIG_FILES, checkpoint_folder
from .config import ConfigLike, QPassConfig, as_plan
from .formats import layout_for
from .module_swap import selected_linears


@dataclasses.dataclass(frozen=True)
class Estimate:
    total_bytes: int  # the model with the plan applied, tensors left in full precision in ``dtype``
    fp16_bytes: int  # every parameter and floating buffer in 16 bits
    fp32_bytes: int  # ... in 32 bits
    layers: dict[str, str]  # quantized layer -> format

    def __str__(self) -> str:
        return (f"{self.total_bytes / 2**20:.2f} MiB quantized ({len(self.layers)} layers), "
                f"{self.fp16_bytes / 2**20:.2f} MiB in fp16, {self.fp32_bytes / 2**20:.2f} MiB in fp32")


def estimate(config_or_dir, spec: ConfigLike | QPassConfig, *, dtype: torch.dtype = torch.float16,
             model_class=None, **plan_options) -> Estimate:
    """Exact bytes of the model described by ``config_or_dir`` (a transformers config, or a checkpoint
    folder or its config.json, or a Hub repository id whose config.json alone is fetched) quantized with
    ``spec``, tensors left in full precision in ``dtype``. ``model_class`` (default
    ``AutoModelForCausalLM``, as ``from_pretrained``) builds the model: another head changes what is
    quantized (a classifier's ``score`` stays in full precision by default).

    Equal to ``qpass.footprint(qpass.quantize(model.to(dtype), spec)).total_bytes`` (tested), but no
    weight is ever made: the model is instantiated on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config_or_dir
    if isinstance(config_or_dir, (str, Path)):
        path = Path(config_or_dir)
        if path.name == "config.json" and path.is_file():
            path = path.parent
        config = AutoConfig.from_pretrained(checkpoint_folder(path, files=CONFIG_FILES))
    plan = as_plan(spec, **plan_options)
    with init_empty_weights(include_buffers=True):
        model = (model_class or AutoModelForCausalLM).from_config(config)
    layers: dict[str, str] = {}
    quantized_bytes, code_books, replaced = 0, {}, set()
    for name, module, weight, layer_config in selected_linears(model, plan):
        layout = layout_for(layer_config, *weight.shape)
        quantized_bytes += layout.nbytes()
        code_books.update(layout.shared_nbytes())
        layers[name] = layer_config.format_name
        replaced.add(id(module.weight))
    everything = {id(t): t for t in (*model.parameters(), *model.buffers())}
    tensors = {key: t for key, t in everything.items() if t.is_floating_point()}
    elements = sum(t.numel() for t in tensors.values())
    kept = sum(t.numel() for key, t in tensors.items() if key not in replaced)
    # integer and bool buffers (GPT-2's causal mask in transformers 4, position ids) keep their dtype
    others = sum(t.numel() * t.element_size() for key, t in everything.items() if key not in tensors)
    total = quantized_bytes + sum(code_books.values()) + kept * dtype.itemsize + others
    return Estimate(total, 2 * elements, 4 * elements, layers)
