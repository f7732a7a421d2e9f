"""Peer implementations the benchmarks compare against (imported only when installed)."""

from __future__ import annotations

import torch
from torch import nn


def bitsandbytes_4bit(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                      compute_dtype: torch.dtype = torch.bfloat16, skip=("lm_head",)) -> nn.Module:
    """Replace ``nn.Linear`` layers by bitsandbytes ``Linear4bit`` (quantized on CPU), in place, each run
    once eagerly: on a CPU with AVX512-BF16, bitsandbytes (0.50) re-packs a layer's weight into its CPU
    layout on the layer's first inference call (``Linear4bit.forward`` assigns ``self.weight.data``), a
    mutation that torch.compile would trace into the graph and then run with the other layout's shapes.
    Elsewhere the call changes nothing."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in skip:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant_type)._quantize(module.weight.device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        layer.eval()
        with torch.no_grad():
            layer(torch.zeros(1, module.in_features, dtype=compute_dtype, device=module.weight.device))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model
