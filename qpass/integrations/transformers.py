"""qpass in transformers: ``AutoModelForCausalLM.from_pretrained(path, quantization_config=qpass.QPassConfig("nf4"))``
quantizes while loading, and ``from_pretrained(path)`` of a qpass checkpoint with several formats
(``quant_method: "qpass"``) loads its qpass layers.

transformers finds a quantizer and its config class by ``quant_method``; ``register`` adds qpass' under
"qpass". ``import qpass`` arranges for that to run when transformers' model loading is imported
(``qpass.integrations.register_with_transformers_on_import``), so ``import qpass`` itself never imports
transformers.

Before the weights load, every selected linear layer becomes a ``QuantizedLinear`` whose tensors are
meta placeholders (their shapes come from quantizing a meta weight: the same code path as the real
thing). Quantizing while loading: as transformers reads each linear weight from the checkpoint it hands
it to ``QPassQuantize``, which quantizes it and returns the layer's tensors in its place: tensor by
tensor, as ``qpass.from_pretrained`` does (transformers 4.57 calls ``create_quantized_param`` instead,
which puts the same tensors into the layer). A qpass checkpoint (transformers 5 only): ``QPassDeserialize``
gathers each quantized layer's stored tensors (the bitsandbytes layout) and builds the layer's tensors
with ``checkpoints.bnb_layout.listed_layer_from_bnb``, the reader ``qpass.from_pretrained`` uses.
``model.save_pretrained`` and ``push_to_hub`` write what ``qpass.save_pretrained`` writes: the
bitsandbytes layout.
"""

from __future__ import annotations

import logging

import torch
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..checkpoints.bnb_layout import STORED_SUFFIXES, check_layer_shape, listed_layer_from_bnb
from ..checkpoints.errors import CheckpointError
from ..checkpoints.save import checkpoint_tensors, record_quantization_config
from ..config import QPASS_QUANT_METHOD, QPassConfig, dtype_from_name
from ..data_parallel import ignore_quantized_tensors_in_ddp
from ..formats import quantize_layer
from ..module_swap import as_out_in, dequantize_module, selected_linears, set_submodule
from ..modules import QuantizedLinear

logger = logging.getLogger(__name__)


def quantized_tensors(model, param_name: str, value: torch.Tensor) -> tuple[QuantizedLinear, dict[str, torch.Tensor]]:
    """The ``QuantizedLinear`` that ``param_name`` (``<layer>.weight``) belongs to, and the tensors of
    ``value``, the checkpoint's weight, quantized with that layer's config."""
    layer, _ = get_module_from_name(model, param_name)
    _, tensors = quantize_layer(as_out_in(layer, value), layer.layout.config, param_name.rpartition(".")[0])
    return layer, {name: t for name, t in tensors.items() if t is not None}


def _named(layers: list[str]) -> str:
    """The first three layer names, and how many more: for error messages."""
    return ", ".join(map(repr, layers[:3])) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")


def offloaded_modules(device_map) -> list[str]:
    """The keys of a ``device_map`` dict that accelerate offloads: modules placed on the disk, or on the CPU
    when the map also names an accelerator (a map of the CPU alone runs there, offloading nothing)."""
    if not isinstance(device_map, dict):
        return []
    accelerated = {str(place) for place in device_map.values()} - {"cpu", "disk"}
    return [name for name, place in device_map.items()
            if str(place) == "disk" or (str(place) == "cpu" and accelerated)]


def is_within(layer: str, module: str) -> bool:
    """Whether ``layer`` is the module ``module`` or inside it (``""``, a device_map's whole model, holds all)."""
    return module == "" or layer == module or layer.startswith(module + ".")


def offload_error(layers: list[str], skip_offloaded: bool, pre_quantized: bool) -> ValueError:
    """The error for a device_map that offloads quantized layers: accelerate offloads parameters, and a
    ``QuantizedLinear`` holds its scales in buffers."""
    if pre_quantized:
        remedy = "This checkpoint stores them quantized."
    elif skip_offloaded:
        remedy = ("With skip_offloaded=True, offloaded layers stay in full precision only when the device_map is "
                  "given as a dict, not inferred ('auto').")
    else:
        remedy = ("To offload them in full precision instead, pass a device_map dict and QPassConfig(..., "
                  "skip_offloaded=True) (bitsandbytes' llm_int8_enable_fp32_cpu_offload).")
    return ValueError(
        f"device_map offloads {_named(layers)} to the CPU or the disk, which qpass layers do not support (accelerate "
        f"offloads parameters; a qpass layer holds its scales in buffers). {remedy} Or give the devices the memory "
        "the quantized model needs (max_memory; qpass.estimate(path, config) tells how much), or load it all on "
        "the CPU (device_map='cpu')")


def missing_weights_error(layers: list[str]) -> ValueError:
    """The error for quantized layers the checkpoint has no tensors for: transformers initialises a
    missing weight at random, and a ``QuantizedLinear`` would keep uninitialised memory instead."""
    return ValueError(
        f"the checkpoint has no weight for {_named(layers)}, which the quantization config quantizes: a quantized "
        "layer cannot be initialised at random, as transformers initialises a missing weight. Leave it in full "
        "precision by naming it in skip_modules (a new head, such as a classifier's, is left out by default when "
        "it holds the model's last parameter)")


try:  # transformers 5: loading runs conversion ops
    from transformers.core_model_loading import ConversionOps, WeightConverter
except ImportError:  # transformers 4.57: QPassHfQuantizer.create_quantized_param
    ConversionOps = WeightConverter = None

if ConversionOps is not None:

    class QPassQuantize(ConversionOps):
        """Quantize one loaded linear weight into the tensors of its ``QuantizedLinear``."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            result = {}
            for param_name, value in input_dict.items():
                layer, tensors = quantized_tensors(model, param_name, value[0] if isinstance(value, list) else value)
                prefix = param_name.rpartition(".")[0]
                result.update({f"{prefix}.{name}": t for name, t in tensors.items()})
                layer._is_hf_initialized = True
                self.hf_quantizer.loaded_layers.add(prefix)
            return result

    class QPassDeserialize(ConversionOps):
        """One linear layer's stored tensors, gathered by their key suffixes (``STORED_SUFFIXES``, the
        bitsandbytes layout), into the tensors of its ``QuantizedLinear``. The converter matches every
        ``*.weight`` of the checkpoint: one stored alone is a full-precision weight, returned as it is
        (cast to the model's dtype for it)."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer  # also tells transformers not to cast what it gathers

        def __deepcopy__(self, memo):
            # transformers copies the converter for each checkpoint tensor; the copies report to one quantizer
            return type(self)(self.hf_quantizer)

        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            stored = {suffix: value[0] if isinstance(value, list) else value for suffix, value in input_dict.items()}
            layer, _ = get_module_from_name(model, full_layer_name)
            name = full_layer_name.rpartition(".")[0]
            listed = layer.layout.config if isinstance(layer, QuantizedLinear) else None
            if listed is None and set(stored) == {"weight"}:
                weight, target = stored["weight"], model.get_parameter_or_buffer(full_layer_name)
                return {"weight": weight.to(target.dtype) if weight.is_floating_point() else weight}
            try:
                layout, tensors = listed_layer_from_bnb(name, stored.__getitem__, set(stored), listed)
                check_layer_shape(name, layout, layer.out_features, layer.in_features)
            except CheckpointError as err:
                # transformers raises after loading; the load report of 5.0 names the layer, not the error
                logger.error("%s", err)
                raise
            layer.layout = layout  # the stored one: it records the original weight's dtype
            layer._is_hf_initialized = True
            self.hf_quantizer.loaded_layers.add(name)
            return {f"{name}.{tensor_name}": t for tensor_name, t in tensors.items() if t is not None}


class QPassHfQuantizer(HfQuantizer):
    """Quantizes each selected linear weight with qpass as transformers loads it."""

    requires_calibration = False
    requires_parameters_quantization = True  # transformers 4.57: call create_quantized_param

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.packed_weight_bytes: dict[str, int] = {}  # "<layer>.weight" -> bytes once quantized
        self.loaded_layers: set[str] = set()  # the QuantizedLinears whose tensors the checkpoint filled
        self.quantized_layers: list[str] | None = None  # known once the model's layers are replaced

    def validate_environment(self, *args, device_map=None, **kwargs):
        if self.pre_quantized and ConversionOps is None:
            # transformers 4 reads a pre-quantized checkpoint key by key into the model's own tensors,
            # casting floats to the model's dtype, which would corrupt the stored scales
            raise ValueError("loading a qpass checkpoint through transformers needs transformers >= 5; on "
                             "transformers 4 load it with qpass.from_pretrained(path)")
        # Called with the map as given, before the model exists (a dict is checked once its layers are
        # replaced), and again with the map device_map="auto" resolved to, sized by the quantized layers.
        if self.quantized_layers is not None:
            self._refuse_offloaded(self.quantized_layers, offloaded_modules(device_map))

    def _refuse_offloaded(self, quantized_layers: list[str], offloaded: list[str]) -> None:
        if refused := [layer for layer in quantized_layers if any(is_within(layer, m) for m in offloaded)]:
            raise offload_error(refused, self.quantization_config.skip_offloaded, self.pre_quantized)

    def update_device_map(self, device_map):
        # As bitsandbytes' quantizer: with no device_map, the model loads onto the current GPU (and is
        # quantized there), not the CPU.
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
            logger.info("no device_map given: loading onto cuda:%d; pass device_map='cpu' to keep the model on "
                        "the CPU", device_map[""])
        return device_map

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        selected = selected_linears(model, self.quantization_config, resolve=not self.pre_quantized)
        offloaded = offloaded_modules(device_map)
        if self.quantization_config.skip_offloaded and not self.pre_quantized:  # left in full precision
            selected = [layer for layer in selected if not any(is_within(layer[0], m) for m in offloaded)]
        self.quantized_layers = [name for name, *_ in selected]
        self._refuse_offloaded(self.quantized_layers, offloaded)  # before any weight is read
        for name, module, weight, config in selected:
            layout, placeholders = quantize_layer(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), config,
                                                  name, allow_meta=True)
            if ConversionOps is not None and not self.pre_quantized:
                # transformers 5 before 5.23 casts each checkpoint tensor to its placeholder's dtype before
                # QPassQuantize sees it: the weight's placeholder is the weight as the model has it, and
                # param_element_size sizes it as the packed bytes it becomes
                packed = placeholders["weight"]
                self.packed_weight_bytes[f"{name}.weight"] = packed.numel() * packed.element_size()
                placeholders = {**placeholders, "weight": torch.empty_like(module.weight, device="meta")}
            layer = QuantizedLinear.replacing(module, layout, placeholders, module.bias, name)
            if ConversionOps is None and layer.packed_weight_parameter is not None:
                # transformers 4.57 initialises GPT-2's c_proj weights through named_parameters before loading
                # (normal_ on uint8 fails): the placeholder waits as a buffer, and create_quantized_param
                # puts the codes in as the frozen parameter
                layer._buffers["weight"] = layer._parameters.pop("weight")
            set_submodule(model, name, layer)
        return ignore_quantized_tensors_in_ddp(model)

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        # transformers 5 sizes modules for device_map="auto" with this: a weight waiting to be quantized
        # counts as the bytes it becomes
        packed = self.packed_weight_bytes.get(param_name)
        return packed / param.numel() if packed is not None else param.element_size()

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return not self.pre_quantized and isinstance(module, QuantizedLinear) and tensor_name == "weight"

    def get_quantize_ops(self):  # transformers 5
        return QPassQuantize(self)

    def get_weight_conversions(self):  # transformers 5: a qpass checkpoint's layers, gathered
        if not self.pre_quantized:
            return []
        return [WeightConverter(source_patterns=list(STORED_SUFFIXES), target_patterns="weight",
                                operations=[QPassDeserialize(self)])]  # by name: a dataclass before 5.1

    def create_quantized_param(self, model, param_value, param_name, target_device, **kwargs):
        # transformers 4.57: quantize on the device the layer goes to, then fill the layer
        layer, tensors = quantized_tensors(model, param_name, param_value.to(target_device))
        for name, tensor in tensors.items():
            layer.set_quantized_tensor_(name, tensor)
        self.loaded_layers.add(param_name.rpartition(".")[0])

    def update_missing_keys(self, model, missing_keys, prefix):
        # transformers 4.57: the checkpoint has a quantized layer's weight, not the tensors made from it
        layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, QuantizedLinear)}
        weights = {f"{name}.weight": name for name in layers}
        if unloaded := list(dict.fromkeys(weights[k] for key in missing_keys
                                          for k in (key, key.removeprefix(f"{prefix}.")) if k in weights)):
            raise missing_weights_error(unloaded)  # before transformers quantizes uninitialised memory for it
        quantized = {f"{name}.{tensor}" for name, layer in layers.items() for tensor in layer.layout.tensor_names}
        return [key for key in missing_keys if key not in quantized and key.removeprefix(f"{prefix}.") not in quantized]

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers initialises a weight missing from the checkpoint at random (and says so in its
        # load report); a QuantizedLinear's tensors would be left as uninitialised memory instead
        if unloaded := [name for name, module in model.named_modules()
                        if isinstance(module, QuantizedLinear) and name not in self.loaded_layers]:
            raise missing_weights_error(unloaded)
        # transformers 5's save_pretrained reverts the converters that loading used, and a deserializer
        # has no reverse; none is needed, since get_state_dict_and_metadata writes the stored layout
        conversions = getattr(model, "_weight_conversions", None)
        if self.pre_quantized and conversions:
            model._weight_conversions = [conversion for conversion in conversions if not any(
                isinstance(op, QPassDeserialize) for op in getattr(conversion, "operations", ()))]
        return model

    def _dequantize(self, model, dtype=None):
        # model.dequantize(): transformers then removes the quantization config. Its default dtype is
        # model.config.dtype, which its save_pretrained leaves as a name ("float32").
        return dequantize_module(model, dtype_from_name(dtype) if isinstance(dtype, str) else dtype)

    def is_serializable(self, safe_serialization: bool = True, **kwargs):
        # transformers 4.57 passes safe_serialization; False there would pickle the state dict
        if not safe_serialization:
            logger.warning("qpass checkpoints are safetensors only: save with safe_serialization=True")
        return safe_serialization

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        """What ``model.save_pretrained`` / ``push_to_hub`` write: the tensors and ``config.json`` that
        ``qpass.save_pretrained`` writes (the bitsandbytes layout). transformers saves ``model.config``
        after this call, so its ``quantization_config`` becomes the checkpoint's here."""
        record_quantization_config(model)
        return checkpoint_tensors(model), {}

    @property
    def is_trainable(self) -> bool:
        return True  # adapters train through the quantized layers (autograd to the input)

    @property
    def is_compileable(self) -> bool:
        # generate() compiles the forward with a static cache only if the quantizer says so (the
        # default is no). The qpass ops trace with no graph break (tests/test_compile.py).
        return True


def register() -> None:
    """Make transformers' lookups by ``quant_method`` find qpass' quantizer, and ``QPassConfig`` for a
    checkpoint's ``quantization_config`` (idempotent)."""
    if QPASS_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QPASS_QUANT_METHOD)(QPassHfQuantizer)
    # register_quantization_config would demand a QuantizationConfigMixin subclass, which QPassConfig is
    # not (qpass.config does not import transformers); transformers asks the class for from_dict only.
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QPASS_QUANT_METHOD, QPassConfig)
