"""Errors that name the layer at fault and say what to do."""

from __future__ import annotations

import torch


class QuantizationError(ValueError):
    """A weight cannot be quantized as asked."""


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(weight: torch.Tensor, layer: str, allow_meta: bool = False) -> None:
    """Raise ``QuantizationError`` naming ``layer`` unless ``weight`` is a finite 2-D float tensor. With
    ``allow_meta``, a weight on the meta device (shape and dtype, no values) passes the other checks."""
    if weight.device.type == "meta" and not allow_meta:
        raise QuantizationError(
            f"layer {layer!r}: its weight is on the meta device (not loaded); load the weights before quantizing "
            "(a model built wholly on the meta device quantizes to an empty skeleton for "
            "load_state_dict(..., assign=True))"
        )
    if weight.dtype not in _FLOAT_DTYPES:
        raise QuantizationError(
            f"layer {layer!r}: weight dtype {weight.dtype} cannot be quantized; qpass quantizes float32, float16 "
            f"and bfloat16 weights. Leave the layer out with skip_modules=[{layer!r}]"
        )
    if weight.dim() != 2:
        raise QuantizationError(f"layer {layer!r}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        return
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise QuantizationError(
            f"layer {layer!r}: weight holds {bad} NaN/Inf value(s); quantizing would spread them over whole "
            f"blocks. Fix the checkpoint, or leave the layer out with skip_modules=[{layer!r}]"
        )
