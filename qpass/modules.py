"""``QuantizedLinear``: the module that replaces ``nn.Linear`` (and transformers' ``Conv1D``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .formats import Layout, quantize_layer

# The quantized tensor held as a parameter: the packed codes, named as every format names them.
PACKED_WEIGHT = "weight"


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is held in a qpass format; ``forward`` calls one ``torch.ops.qpass`` op.

    The quantized tensors are named after the format's tensors (``weight``, ``absmax``, ... for 4-bit;
    ``weight`` and ``SCB`` for int8), so ``state_dict`` keys follow bitsandbytes. ``weight``, the packed
    codes (uint8 or int8: 89% of a 4-bit layer's bytes, 97% with double quantization, 99% of an int8
    layer's from 400 input features on), is a frozen ``nn.Parameter``, as bitsandbytes' ``Params4bit``
    and ``Int8Params`` are: FSDP2 (``fully_shard``) shards it, and ``model.parameters()`` lists it. The
    scales and code books are buffers. With a float ``quant_storage`` the packed weight is a buffer
    too: PEFT's ``prepare_model_for_kbit_training`` casts bf16/fp16 parameters to float32, which would
    corrupt codes held in a float dtype. The quantized tensors move with the module between devices but
    never change dtype: ``model.half()`` casts only the bias. A quantized tensor cast in place behind the
    module's back (``tensor.data = tensor.to(dtype)``, as FSDP1's ``MixedPrecision(buffer_dtype=...)``
    does to every float buffer) is refused by ``forward``, naming the layer, rather than computed with.

    ``name`` (the layer's name in the model, as quantized; kept as ``layer_name``) only names the layer in
    errors.
    """

    def __init__(self, layout: Layout, tensors: dict[str, torch.Tensor | None], bias: nn.Parameter | None,
                 from_conv1d: bool = False, name: str = ""):
        super().__init__()
        self.layer_name = name
        self.layout = layout
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        for name in layout.tensor_names:
            self.set_quantized_tensor_(name, tensors[name])
        self.bias = bias
        self.from_conv1d = from_conv1d  # the original was transformers' Conv1D ([in, out] weight)

    @classmethod
    def replacing(cls, module: nn.Module, layout: Layout, tensors: dict[str, torch.Tensor | None],
                  bias: nn.Parameter | None, name: str = "") -> QuantizedLinear:
        """The layer that replaces ``module`` (named ``name``), an ``nn.Linear`` or a transformers
        ``Conv1D``, remembering which (``qpass.dequantize`` gives the same kind back)."""
        return cls(layout, tensors, bias, from_conv1d=not isinstance(module, nn.Linear), name=name)

    def set_quantized_tensor_(self, name: str, tensor: torch.Tensor | None) -> None:
        """Hold ``tensor`` as the quantized tensor ``name``: a frozen parameter for packed integer codes
        (``weight``; a parameter given is kept as it is, as FSDP2 needs), a buffer otherwise (see the
        class docstring). Setting a quantized tensor as an attribute (transformers' loading does, and
        ``nn.DataParallel``'s ``replicate`` on the bare copy of each module) comes here too."""
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        if name == PACKED_WEIGHT and tensor is not None and not tensor.is_floating_point():
            if not isinstance(tensor, nn.Parameter):
                param = nn.Parameter(tensor, requires_grad=False)
                param.__dict__.update(tensor.__dict__)  # flags set on it (transformers' _is_hf_initialized)
                tensor = param
            self._parameters[name] = tensor
        else:
            self._buffers[name] = tensor.detach() if isinstance(tensor, nn.Parameter) else tensor

    def __setattr__(self, name: str, value) -> None:
        layout = self.__dict__.get("layout")
        if layout is not None and name in layout.tensor_names and (value is None or isinstance(value, torch.Tensor)):
            self.set_quantized_tensor_(name, value)
        else:
            super().__setattr__(name, value)

    @property
    def packed_weight_parameter(self) -> nn.Parameter | None:
        """The packed weight if it is a parameter (integer codes), else None (codes in a float quant_storage)."""
        return self._parameters.get(PACKED_WEIGHT)

    @property
    def quantized_tensors(self) -> dict[str, torch.Tensor | None]:
        # Read from the module's own dicts, where set_quantized_tensor_ (and accelerate's hooks) put them:
        # nn.Module.__getattr__ costs about 0.75 us a name, and every eager forward reads all of them.
        parameters, buffers = self._parameters, self._buffers
        return {name: parameters[name] if name in parameters else buffers[name] for name in self.layout.tensor_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.quantized_tensors
        for tensor_name, dtype in self.layout.tensor_dtypes().items():
            if tensors[tensor_name].dtype != dtype:
                self._refuse_cast_tensor(tensor_name, tensors[tensor_name].dtype, dtype)
        op, args = self.layout.linear_call(x, tensors, self.bias)
        return op(*args)

    def _refuse_cast_tensor(self, tensor_name: str, found: torch.dtype, expected: torch.dtype) -> None:
        name, c = self.layer_name or type(self).__name__, self.layout.config
        raise TypeError(
            f"layer {name!r} ({c.format_name}, {self.out_features}x{self.in_features}): "
            f"its quantized tensor {tensor_name!r} is {found}, but the format holds it as {expected}. Something cast "
            "it in place after quantizing, and the layer would compute with corrupted codes or rounded scales. "
            "FSDP1's MixedPrecision casts every float buffer to its buffer_dtype (accelerate sets buffer_dtype to "
            "the mixed-precision dtype): pass MixedPrecision(param_dtype=..., reduce_dtype=...) with buffer_dtype "
            "None, or shard with FSDP2 (fully_shard), which casts no buffer and no integer parameter. Quantize "
            "again from the full-precision weights to recover the layer.")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out_features, in_features]`` in full precision (compute dtype by default)."""
        return self.layout.dequantize(self.quantized_tensors, dtype or self.layout.config.compute_dtype)

    def requantize_(self, weight: torch.Tensor, name: str = "") -> None:
        """Replace the quantized tensors by those of ``weight`` (float, ``[out_features, in_features]``)
        quantized with this layer's config, on the device they are on: merging a LoRA adapter into the
        layer (``qpass.integrations.peft``). Lossy, as re-quantizing always is: one more rounding to the
        format. The layout stays the layer's: the weight's own dtype (float32 for a merge) is not
        recorded as the original's (``Layout4bit.source_dtype``). ``name`` names the layer in errors."""
        name = name or self.layer_name or type(self).__name__
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"layer {name!r}: expected a weight of shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        layout, tensors = quantize_layer(weight.to(self.weight.device), self.layout.config, name)
        assert (layout.out_features, layout.in_features, layout.config) == (
            self.out_features, self.in_features, self.layout.config), (layout, self.layout)
        for tensor_name in self.layout.tensor_names:
            self.set_quantized_tensor_(tensor_name, tensors[tensor_name])

    def set_compute_dtype_(self, dtype: torch.dtype) -> None:
        """Compute in ``dtype`` from now on (bitsandbytes' ``Linear4bit.compute_dtype``); the quantized tensors
        are unchanged. A graph already compiled or exported keeps the dtype it was traced with."""
        config = dataclasses.replace(self.layout.config, compute_dtype=dtype)  # the config validates dtype
        self.layout = dataclasses.replace(self.layout, config=config)

    def _apply(self, fn, recurse=True):
        # Quantized tensors follow device moves only: a dtype cast would corrupt packed codes and scales.
        quantized = {id(t) for t in self.quantized_tensors.values() if t is not None}

        def move_only(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in quantized:
                return fn(t)
            if t.device.type == "meta":  # a skeleton: to_empty() gives uninitialised storage, .to() torch's error
                moved = fn(t)
                return moved if moved.dtype == t.dtype else torch.empty_like(t, device=moved.device)
            return t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)

        return super()._apply(move_only, recurse)

    def extra_repr(self) -> str:
        c = self.layout.config
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {c}"
