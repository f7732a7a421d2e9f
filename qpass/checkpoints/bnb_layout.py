"""The transformers + bitsandbytes serialization of quantized linears, both ways.

For a 4-bit layer ``L`` (``save_pretrained`` of a bitsandbytes 4-bit model):

* ``L.weight``: packed codes (uint8, or the quant_storage dtype), ``L.weight.absmax``,
  ``L.weight.quant_map`` (16 float32), with double quantization ``L.weight.nested_absmax`` and
  ``L.weight.nested_quant_map`` (256 float32);
* ``L.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 tensor of UTF-8 JSON with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``,
  ``nested_dtype``, ``nested_offset`` (the double-quantization offset as a JSON number).

For an int8 layer: ``L.weight`` (int8 CB), ``L.SCB`` (float32) and ``L.weight_format`` (uint8 scalar,
0 = row-major). ``config.json`` carries ``quantization_config`` with ``quant_method: "bitsandbytes"``.
"""

from __future__ import annotations

import json

import torch

from ..config import QPASS_QUANT_METHOD, FP4Config, Int8Config, NF4Config, QuantConfig, Weight4bitConfig
from ..config import config_to_dict, dtype_name
from ..config import dtype_from_name as config_dtype_from_name
from ..formats import Layout, Layout4bit, LayoutInt8
from ..kernels.codebooks import DOUBLE_QUANT_BLOCKSIZE, code_4bit, dynamic_code
from .errors import CheckpointError

QUANT_STATE_PREFIX = "weight.quant_state.bitsandbytes__"
# Every key suffix ``layer_to_bnb`` writes, for loaders that name them up front (transformers' converters).
# "weight" comes last: transformers before 5.23 tries them in order, and "weight" also begins the others.
STORED_SUFFIXES = ("weight.nested_absmax", "weight.nested_quant_map", "weight.quant_map", "weight.absmax",
                   QUANT_STATE_PREFIX + "nf4", QUANT_STATE_PREFIX + "fp4", "SCB", "weight_format", "weight")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return config_dtype_from_name(name)
    except ValueError:
        raise CheckpointError(f"unknown dtype {name!r} in a checkpoint") from None


def layer_to_bnb(layout: Layout, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """``{key suffix: tensor}`` of one quantized layer, suffixes relative to the layer's name."""
    if isinstance(layout, LayoutInt8):
        return {"weight": tensors["weight"], "SCB": tensors["SCB"], "weight_format": torch.tensor(0, dtype=torch.uint8)}
    if not isinstance(layout, Layout4bit):
        raise CheckpointError(f"no bitsandbytes serialization for {type(layout).__name__}")
    c = layout.config
    state = {"quant_type": c.quant_type, "blocksize": c.blocksize, "dtype": dtype_name(layout.source_dtype),
             "shape": [layout.out_features, layout.in_features]}
    out = {"weight": tensors["weight"], "weight.absmax": tensors["absmax"], "weight.quant_map": tensors["quant_map"]}
    if c.double_quant:
        out["weight.nested_absmax"] = tensors["nested_absmax"]
        out["weight.nested_quant_map"] = tensors["nested_quant_map"]
        state.update(nested_blocksize=DOUBLE_QUANT_BLOCKSIZE, nested_dtype="float32",
                     nested_offset=float(tensors["offset"].item()))
    out[QUANT_STATE_PREFIX + c.quant_type] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


def is_quantized_layer(suffixes: set[str]) -> bool:
    return "SCB" in suffixes or any(s.startswith(QUANT_STATE_PREFIX) for s in suffixes)


def layer_from_bnb(name: str, read, suffixes: set[str], compute_dtype: torch.dtype, threshold: float):
    """``(layout, tensors)`` of layer ``name`` from a bitsandbytes checkpoint. ``read(suffix)`` returns a
    stored tensor; ``suffixes`` are the stored key suffixes of this layer."""
    if "SCB" in suffixes:
        cb, scb = read("weight"), read("SCB")
        if cb.dtype != torch.int8 or cb.dim() != 2 or scb.shape != (cb.shape[0],):
            raise CheckpointError(f"{name}: expected int8 weight [out, in] and float32 SCB [out], "
                                  f"got {cb.dtype} {tuple(cb.shape)} and {tuple(scb.shape)}")
        layout = LayoutInt8(cb.shape[0], cb.shape[1], Int8Config(threshold=threshold, compute_dtype=compute_dtype))
        return layout, {"weight": cb, "SCB": scb.float()}
    (state_key,) = [s for s in suffixes if s.startswith(QUANT_STATE_PREFIX)]
    try:
        state = json.loads(bytes(read(state_key).tolist()).decode())
        quant_type, blocksize, (out_features, in_features) = state["quant_type"], state["blocksize"], state["shape"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name}.{state_key}: not a bitsandbytes quant state ({err})") from err
    nested = "nested_offset" in state
    packed = read("weight")
    cls = {"nf4": NF4Config, "fp4": FP4Config}.get(quant_type)
    if cls is None:
        raise CheckpointError(f"{name}: quant_type {quant_type!r} is not nf4 or fp4")
    config = cls(blocksize=blocksize, double_quant=nested, compute_dtype=compute_dtype, quant_storage=packed.dtype)
    n = out_features * in_features
    n_blocks = -(-n // blocksize)
    expected = {"weight": ((n + 1) // 2 // packed.element_size(), 1), "weight.absmax": (n_blocks,),
                "weight.quant_map": (16,)}
    tensors = {"weight": packed, "absmax": read("weight.absmax"), "quant_map": read("weight.quant_map").float(),
               "nested_absmax": None, "nested_quant_map": None, "offset": None}
    if nested:
        tensors["nested_absmax"] = read("weight.nested_absmax").float()
        tensors["nested_quant_map"] = read("weight.nested_quant_map").float()
        tensors["offset"] = torch.tensor(state["nested_offset"], dtype=torch.float32, device=packed.device)
        expected["weight.nested_absmax"] = (-(-n_blocks // state.get("nested_blocksize", DOUBLE_QUANT_BLOCKSIZE)),)
        expected["weight.nested_quant_map"] = (256,)
    for suffix, shape in expected.items():
        actual = tuple(read(suffix).shape)
        if actual != shape:
            raise CheckpointError(f"{name}.{suffix}: shape {actual} does not match the quant state ({shape} for a "
                                  f"{out_features}x{in_features} {quant_type} weight, blocksize {blocksize})")
    layout = Layout4bit(out_features, in_features, config, dtype_from_name(state.get("dtype", "float32")))
    absmax_dtype = layout.tensor_dtypes()["absmax"]  # the one tensor stored as it is read (the rest: .float())
    if tensors["absmax"].dtype != absmax_dtype:
        raise CheckpointError(f"{name}.weight.absmax: dtype {tensors['absmax'].dtype}, where a {quant_type} weight "
                              f"{'with' if nested else 'without'} double quantization stores {absmax_dtype}")
    return layout, _share_code_books(tensors, quant_type)


def check_layer_shape(name: str, layout: Layout, out_features: int, in_features: int) -> None:
    """Refuse a stored layer whose weight is not the ``out_features x in_features`` of the model's layer."""
    if (layout.out_features, layout.in_features) != (out_features, in_features):
        raise CheckpointError(f"{name}: the checkpoint holds a {layout.out_features}x{layout.in_features} weight, "
                              f"the model's layer is {out_features}x{in_features}")


def listed_layer_from_bnb(name: str, read, suffixes: set[str], listed: QuantConfig | None):
    """``layer_from_bnb`` for layer ``name`` of a qpass checkpoint, whose ``quantization_config`` lists the
    format of every quantized layer (``listed``; None where it does not list this one). The compute dtype
    and int8 threshold come from there; stored tensors that contradict it are an error naming the layer."""
    if listed is None:
        raise CheckpointError(f"{name}: quantized in the checkpoint, but its quantization_config does not list it "
                              "under layers")
    if not is_quantized_layer(suffixes):
        raise CheckpointError(f"{name}: quantization_config lists it as {listed.format_name}, but the checkpoint "
                              "holds it in full precision")
    layout, tensors = layer_from_bnb(name, read, suffixes, listed.compute_dtype, getattr(listed, "threshold", 6.0))
    if layout.config != listed:
        raise CheckpointError(f"{name}: the checkpoint holds a {layout.config}, its quantization_config says {listed}")
    return layout, tensors


def _share_code_books(tensors: dict, quant_type: str) -> dict:
    """Stored code books equal to the standard ones become the one shared tensor, as after quantize()."""
    def same_bytes(a, b):
        return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))

    device = tensors["quant_map"].device
    if same_bytes(tensors["quant_map"], code_4bit(quant_type, device)):
        tensors["quant_map"] = code_4bit(quant_type, device)
    if tensors["nested_quant_map"] is not None and same_bytes(tensors["nested_quant_map"], dynamic_code(device)):
        tensors["nested_quant_map"] = dynamic_code(device)
    return tensors


def quantization_config(configs: dict[str, QuantConfig], skipped: list[str]) -> dict:
    """``config.json``'s ``quantization_config`` for a model whose quantized layers use ``configs``.

    One format throughout: bitsandbytes' own fields, so transformers + bitsandbytes loads it. Several
    formats (e.g. int8 attention, nf4 MLP): ``quant_method: "qpass"`` with the format of every layer,
    which only qpass reads."""
    distinct = set(configs.values())
    common = {"llm_int8_skip_modules": skipped or None, "llm_int8_has_fp16_weight": False,
              "llm_int8_enable_fp32_cpu_offload": False}
    if len(distinct) == 1:
        (config,) = distinct
        if isinstance(config, Weight4bitConfig):
            return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                    "bnb_4bit_quant_type": config.quant_type, "bnb_4bit_use_double_quant": config.double_quant,
                    "bnb_4bit_compute_dtype": dtype_name(config.compute_dtype),
                    "bnb_4bit_quant_storage": dtype_name(config.quant_storage), "llm_int8_threshold": 6.0, **common}
        if isinstance(config, Int8Config):
            return {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True,
                    "llm_int8_threshold": config.threshold,
                    "qpass_int8_compute_dtype": dtype_name(config.compute_dtype), **common}
    layers = {name: config_to_dict(c) for name, c in configs.items()}
    return {"quant_method": QPASS_QUANT_METHOD, "layers": layers, **common}
