"""``qpass.from_pretrained``: load a quantized checkpoint, or quantize a full-precision one while loading.

The model is built on the meta device (parameters only; buffers such as rotary tables stay real) and
filled tensor by tensor from the safetensors files: a quantized layer is built straight from its
stored tensors, and when quantizing while loading, each linear weight is read, quantized and dropped
before the next, so peak memory stays near the quantized size plus the largest tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..config import QPASS_QUANT_METHOD, ConfigLike, QPassConfig, as_plan, format_from_bitsandbytes
from ..data_parallel import ignore_quantized_tensors_in_ddp
from ..formats import quantize_layer
from ..module_swap import as_out_in, linear_layers, linear_weight, plan_for_model, set_submodule
from ..modules import QuantizedLinear
from .bnb_layout import check_layer_shape, is_quantized_layer, layer_from_bnb, listed_layer_from_bnb
from .converted import keys_transformers_converts, load_through_transformers
from .errors import CheckpointError
from .hub import checkpoint_folder
from .safetensors_io import SafetensorsReader


# Where the strict loader sends a user whose checkpoint and class differ: transformers drops unexpected
# tensors and initialises missing ones (but a layer qpass quantizes cannot be initialised:
# integrations.transformers.missing_weights_error).
OTHER_CLASS_HINT = ("qpass.from_pretrained loads exactly what a checkpoint holds into its class; to load it into "
                    "another (a classifier from a causal LM: its head dropped, a new one started at random), load "
                    "through transformers: model_class.from_pretrained(path, "
                    "quantization_config=qpass.QPassConfig(...))")


def from_pretrained(
    path: str | Path,
    spec: ConfigLike | QPassConfig = None,
    *,
    model_class=None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    revision: str | None = None,
    device: torch.device | str = "cpu",
    **plan_options,
) -> nn.Module:
    """A transformers model from the checkpoint folder ``path``, or from the Hugging Face Hub repository
    of that id (``"org/name"``, at ``revision``; ``hub.checkpoint_folder`` fetches it, safetensors only).

    * A checkpoint with a bitsandbytes (or qpass) ``quantization_config``: its quantized layers load
      as they are stored (give no ``spec``).
    * A full-precision checkpoint: ``spec`` ("nf4", "fp4", "int8", a config, a ``QPassConfig`` or a
      transformers ``BitsAndBytesConfig``;
      ``plan_options`` as for ``qpass.quantize``) quantizes each selected linear layer as it is read.

    ``device`` ("cpu", "cuda", "cuda:1", ...) is where the model is built: each tensor is read straight
    onto it, and quantized there when quantizing while loading, so no full-precision copy of the model
    is held on the CPU. ``dtype`` casts the tensors that stay in full precision (default: as stored).
    ``model_class`` defaults to ``AutoModelForCausalLM``. ``progress`` shows a progress bar over the
    stored tensors.

    A checkpoint whose tensors transformers (>= 5) renames or merges while loading (a mixture-of-experts
    model's per-expert tensors, a vision-language model's ``language_model.model.*``) is loaded by
    ``model_class.from_pretrained`` with qpass' quantizer instead, which applies those conversions.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = checkpoint_folder(path, revision)
    device = _loading_device(device)
    reader = SafetensorsReader(path, device)
    config = AutoConfig.from_pretrained(path)
    stored = getattr(config, "quantization_config", None)
    if stored is not None and not isinstance(stored, dict):
        stored = stored.to_dict()
    if stored and spec is not None:
        raise CheckpointError(f"{path} is already quantized ({stored.get('quant_method')}); load it without a format")
    if stored and stored.get("quant_method") not in ("bitsandbytes", QPASS_QUANT_METHOD):
        raise CheckpointError(f"{path}: quant_method {stored.get('quant_method')!r} is not one qpass reads "
                              "(bitsandbytes or qpass)")
    listed, bnb_settings = _stored_formats(stored, path) if stored else (None, None)
    if stored:
        del config.quantization_config
    plan = as_plan(spec, **plan_options) if spec is not None else None
    with init_empty_weights(include_buffers=False):
        try:
            model = (model_class or AutoModelForCausalLM).from_config(config)
        except ValueError as err:
            raise CheckpointError(f"{path}: transformers cannot build this architecture ({err})") from err
    converted = keys_transformers_converts(model, reader.keys())
    if converted:
        if stored:
            config.quantization_config = stored
        return load_through_transformers(path, model_class or AutoModelForCausalLM, config, plan, model, reader,
                                         converted, bnb_settings, dtype, device, progress)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(reader.keys()), unit="tensor", desc=f"{'quantizing' if plan else 'loading'} {path.name}",
               disable=not progress)
    consumed: set[str] = set()
    # linear_layers leaves out an output layer tied to the input embedding (tie_weights() runs after loading)
    if plan is not None:
        plan = plan_for_model(model, plan)
    for name, module, _ in linear_layers(model):
        suffixes = reader.suffixes_under(name)
        if stored and (is_quantized_layer(suffixes) or (listed is not None and listed.config_for(name) is not None)):
            layer = _stored_layer(name, reader, suffixes, bnb_settings, listed, module, dtype)
        elif plan is not None and f"{name}.weight" in reader and (layer_config := plan.config_for(name)) is not None:
            layer = _quantize_while_loading(name, reader, module, layer_config, dtype)
        else:
            continue
        consumed.update(f"{name}.{s}" for s in suffixes)
        set_submodule(model, name, layer)
        bar.update(len(suffixes))

    for key in reader.keys():
        if key not in consumed:
            _assign(model, key, reader.get(key), dtype, path)
            bar.update(1)
    bar.close()
    if stored:
        config.quantization_config = stored
    model.tie_weights()
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{path}: tensor {missing[0]!r} is missing from the checkpoint"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f". {OTHER_CLASS_HINT}")
    ignore_quantized_tensors_in_ddp(model)
    return model.to(device).eval()  # moves the buffers the model made itself (rotary tables); the rest was read there


def _dropped_on_load(model: nn.Module, key: str) -> bool:
    """Whether transformers drops checkpoint tensor ``key``, which ``model`` has no place for, by design: the
    model class lists it as expected but unused (``_keys_to_ignore_on_load_unexpected``: BART's
    ``encoder.version``, ...), or it is a rotary embedding's ``inv_freq``, which older Llama-family
    checkpoints hold (``model.layers.0.self_attn.rotary_emb.inv_freq``) and every model computes from its
    config."""
    patterns = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()), r"(^|\.)inv_freq$"]
    return any(re.search(pattern, key) for pattern in patterns)


def _loading_device(device: torch.device | str) -> torch.device:
    """``device`` checked, with the current CUDA device's index filled in for a bare "cuda"."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise CheckpointError(f"device={device!r} is not a device torch knows ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device={str(device)!r}, but torch sees no CUDA device here; load onto the CPU "
                                  "(device='cpu', the default)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _stored_formats(stored: dict, path: Path) -> tuple[QPassConfig | None, tuple[torch.dtype, float] | None]:
    """What a checkpoint's quantization_config says of its quantized layers: a qpass checkpoint lists
    each layer's format (a ``QPassConfig``); a bitsandbytes one (one format) gives every layer's
    (compute dtype, int8 threshold), the rest of each layout coming from its stored tensors. int8
    computes as bitsandbytes does (activations quantized from float16) unless qpass recorded another."""
    try:
        if stored.get("quant_method") == QPASS_QUANT_METHOD:
            return QPassConfig.from_dict(stored), None
        config = format_from_bitsandbytes(stored)
        return None, (config.compute_dtype, getattr(config, "threshold", 6.0))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: config.json's quantization_config is not one qpass reads ({err})") from err


def _stored_layer(name, reader, suffixes, bnb_settings, listed, module, dtype) -> QuantizedLinear:
    def read(suffix):
        return reader.get(f"{name}.{suffix}")

    if listed is not None:
        layout, tensors = listed_layer_from_bnb(name, read, suffixes, listed.config_for(name))
    else:
        layout, tensors = layer_from_bnb(name, read, suffixes, *bnb_settings)
    check_layer_shape(name, layout, *linear_weight(module).shape)
    # a Conv1D's weight is stored [out, in] like a Linear's (as bitsandbytes stores it)
    return QuantizedLinear.replacing(module, layout, tensors, _bias(name, reader, module, dtype), name)


def _quantize_while_loading(name, reader, module, config, dtype) -> QuantizedLinear:
    weight = reader.get(f"{name}.weight")
    if tuple(weight.shape) != tuple(module.weight.shape):
        raise CheckpointError(f"{name}.weight: shape {tuple(weight.shape)} in the checkpoint, "
                              f"{tuple(module.weight.shape)} in the model")
    layout, tensors = quantize_layer(as_out_in(module, weight), config, name)
    del weight
    return QuantizedLinear.replacing(module, layout, tensors, _bias(name, reader, module, dtype), name)


def _bias(name, reader, module, dtype) -> nn.Parameter | None:
    if getattr(module, "bias", None) is None:
        return None
    bias = reader.get(f"{name}.bias")
    return nn.Parameter(bias.to(dtype) if dtype else bias)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, dtype, path) -> None:
    """Put checkpoint tensor ``key`` into ``model`` (cast to ``dtype`` if floating point). A tensor the model
    has no place for is an error naming it, unless transformers drops it by design (``_dropped_on_load``)."""
    module_name, _, attr = key.rpartition(".")
    try:
        owner = model.get_submodule(module_name)
    except AttributeError:
        owner = None
    current = getattr(owner, attr, None)
    if not isinstance(current, torch.Tensor):
        if _dropped_on_load(model, key):
            return
        raise CheckpointError(f"{path}: tensor {key!r} does not belong to this {type(model).__name__}. "
                              f"{OTHER_CLASS_HINT}")
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(current.shape)}")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=current.requires_grad)
    else:
        owner._buffers[attr] = tensor
