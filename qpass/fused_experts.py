"""Mixture-of-experts weights that no qpass format quantizes: found so that a plan says so, or left alone.

transformers 5 stores the experts of its MoE models as fused parameters of three dimensions, one
``[num_experts, out, in]`` tensor per projection (``MixtralExperts.gate_up_proj`` and ``.down_proj``,
``Qwen3MoeExperts``, ``GptOssExperts``, ...), multiplied with ``bmm``/grouped GEMMs rather than through
``nn.Linear``. qpass, like bitsandbytes (bitsandbytes#1849) and torchao's linear configs, quantizes linear
layers only, so these stay in full precision: most of an MoE model's weights. Both front-ends and the
loaders warn of them rather than return a model far larger than its format suggests.

Their routers (``MixtralTopKRouter``, ``GptOssTopKRouter``, ...) hold an ``[experts, hidden]`` weight they
multiply with ``F.linear``. The module front-end never sees them (they are not ``nn.Linear``), nor does
bitsandbytes; the graph front-end sees an ``aten.linear`` and leaves it alone too (``is_router``): a few
KB, whose rounding would change which experts run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch


def fused_expert_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """``(name, number of weights)`` of each fused expert weight among ``named_tensors``: a floating-point
    tensor of three or more dimensions held by a module whose name ends in "experts" (``mlp.experts``,
    ``feed_forward.experts``: transformers' naming). Meta tensors count too (a model built empty)."""
    return [(name, tensor.numel()) for name, tensor in named_tensors
            if tensor.dim() >= 3 and tensor.is_floating_point()
            and name.rpartition(".")[0].rpartition(".")[2].lower().endswith("experts")]


def warn_unquantized_experts(named_tensors: Iterable[tuple[str, torch.Tensor]], model_name: str) -> None:
    """Warn, once per model, that its fused expert weights (``fused_expert_weights``) stay in full
    precision, naming two of them and their share of the model's floating-point weights."""
    named_tensors = [(name, t) for name, t in named_tensors if t.is_floating_point()]
    fused = fused_expert_weights(named_tensors)
    if not fused:
        return
    share = sum(n for _, n in fused) / sum(t.numel() for _, t in named_tensors)
    names = ", ".join(repr(name) for name, _ in fused[:2]) + (f" and {len(fused) - 2} more" if len(fused) > 2 else "")
    warnings.warn(
        f"qpass: {model_name} holds its mixture-of-experts weights as fused parameters of three dimensions "
        f"({names}: {share:.0%} of its weights), which qpass leaves in full precision: its formats quantize "
        "linear layers only, as bitsandbytes' do (bitsandbytes#1849). The quantized model keeps those weights "
        "at their current size.", UserWarning, stacklevel=2)


def is_router(module_type: type | str) -> bool:
    """Whether ``module_type`` (a class, or its qualified name as ``torch.export`` records it in a node's
    ``nn_module_stack``) is a mixture-of-experts router: transformers names every one ``*Router``
    (``MixtralTopKRouter``, ``DeepseekV3TopkRouter``, ``DbrxRouter``, ...)."""
    name = module_type if isinstance(module_type, str) else module_type.__qualname__
    return name.rpartition(".")[2].endswith("Router")
