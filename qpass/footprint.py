"""``qpass.footprint``: bytes per quantized layer and in total, against the fp16 / fp32 original."""

from __future__ import annotations

import dataclasses

from torch import nn

from .fused_experts import fused_expert_weights
from .modules import QuantizedLinear

@dataclasses.dataclass(frozen=True)
class LayerFootprint:
    name: str
    format: str
    weights: int  # out_features * in_features
    nbytes: int  # quantized tensors, code books excluded

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.weights


@dataclasses.dataclass(frozen=True)
class Footprint:
    layers: list[LayerFootprint]
    total_bytes: int  # every parameter and buffer of the model, each storage once
    fp16_bytes: int  # the same model with every weight in float16
    fp32_bytes: int  # ... in float32
    fused_expert_bytes: int = 0  # mixture-of-experts weights no format quantizes (``qpass.fused_experts``)

    @property
    def quantized_weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def bits_per_quantized_weight(self) -> float:
        return 8 * sum(layer.nbytes for layer in self.layers) / max(self.quantized_weights, 1)

    def by_format(self) -> dict[str, tuple[int, int]]:
        """``{format: (weights, bytes)}`` over the quantized layers."""
        out: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            weights, nbytes = out.get(layer.format, (0, 0))
            out[layer.format] = (weights + layer.weights, nbytes + layer.nbytes)
        return out

    def __str__(self) -> str:
        rows = [f"{'layer':<48} {'format':<6} {'weights':>11} {'bytes':>11} {'bits/w':>7}"]
        rows += [
            f"{layer.name:<48} {layer.format:<6} {layer.weights:>11,} {layer.nbytes:>11,} {layer.bits_per_weight:>7.3f}"
            for layer in self.layers
        ]
        for fmt, (weights, nbytes) in self.by_format().items():
            label = f"all {fmt} layers"
            rows.append(f"{label:<48} {fmt:<6} {weights:>11,} {nbytes:>11,} {8 * nbytes / weights:>7.3f}")
        if self.fused_expert_bytes:
            rows.append(f"fused mixture-of-experts weights, in full precision: {self.fused_expert_bytes / 2**20:.2f} "
                        f"MiB ({self.fused_expert_bytes / self.total_bytes:.0%} of the model)")
        rows.append(
            f"model: {self.total_bytes / 2**20:.2f} MiB, against {self.fp16_bytes / 2**20:.2f} MiB in fp16 "
            f"({self.fp16_bytes / self.total_bytes:.2f}x) and {self.fp32_bytes / 2**20:.2f} MiB in fp32 "
            f"({self.fp32_bytes / self.total_bytes:.2f}x)"
        )
        return "\n".join(rows)


def footprint(model: nn.Module) -> Footprint:
    """Measure ``model``: each ``QuantizedLinear`` and the whole model, every storage counted once."""
    layers = []
    full_precision_elements = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            nbytes = sum(
                # code books (one tensor for every layer) count once in the total, not per layer
                t.nbytes for n, t in module.quantized_tensors.items()
                if t is not None and n not in module.layout.shared_tensor_names
            )
            weights = module.in_features * module.out_features
            layers.append(LayerFootprint(name, module.layout.config.format_name, weights, nbytes))
            full_precision_elements += weights
    quantized_ids = {
        id(t) for m in model.modules() if isinstance(m, QuantizedLinear)
        for t in m.quantized_tensors.values() if t is not None
    }
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
        if id(tensor) not in quantized_ids and tensor.is_floating_point():
            full_precision_elements += tensor.numel()
    parameters = dict(model.named_parameters())
    fused = sum(parameters[name].nbytes for name, _ in fused_expert_weights(parameters.items()))
    return Footprint(layers, total, 2 * full_precision_elements, 4 * full_precision_elements, fused)
