"""QLoRA with PEFT: LoRA adapters on the ``QuantizedLinear`` layers of a qpass model.

    from peft import LoraConfig
    from qpass.integrations import peft as qpass_peft

    model = qpass.quantize(model, "nf4")   # or AutoModelForCausalLM.from_pretrained(..., quantization_config=...)
    model = qpass_peft.prepare_model_for_kbit_training(model)   # frozen, norms in fp32, checkpointing
    model = qpass_peft.get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    ...                                    # train: the quantized weights stay frozen, the adapters learn
    model.save_pretrained("adapter/")      # the adapter only, as PEFT writes it
    model = qpass_peft.load_adapter(qpass.quantize(base, "nf4"), "adapter/")
    merged = model.merge_and_unload()      # re-quantized: small adapters round away (see merge)
    merged = qpass.dequantize(model).merge_and_unload()   # or full precision: the adapters kept whole

PEFT knows bitsandbytes' layers but not qpass', so ``prepare_lora_config`` registers
``QuantizedLoraLinear`` for ``QuantizedLinear`` through PEFT's custom-module API and turns
``target_modules="all-linear"`` into the names of the model's linear layers, quantized or not, the output
embedding excluded (PEFT's own expansion only sees ``nn.Linear``). Pass its result wherever PEFT takes a
``LoraConfig`` (``peft.get_peft_model``, trl's ``SFTTrainer(peft_config=...)``); ``get_peft_model`` and
``load_adapter`` here are that, around PEFT's functions of the same job. ``prepare_model_for_kbit_training``
is PEFT's, plus the gradient checkpointing PEFT turns on only for quantizers it knows. The models these
two return count each quantized weight in ``print_trainable_parameters`` (``count_parameters``), as PEFT
does bitsandbytes' packed weights.

The layer is PEFT's ``lora.Linear`` (same forward, dropout, scaling, rsLoRA, ``lora_bias``, several
adapters, ``adapter_names`` batches) with two changes. Merging dequantizes the weight to float32, adds
``B @ A * scaling`` and quantizes the sum again with the layer's config
(``QuantizedLinear.requantize_``), as PEFT does for bitsandbytes' 4-bit layers: one more rounding,
which takes away any change smaller than the format's step (most of a short fine-tune: README), and
unmerging does not restore the original bytes; after ``qpass.dequantize(model)`` the base layers are
full precision and merging adds the delta to their weights, as PEFT does. And anything that would read the
packed bytes as a float weight is refused with the layer's name: LoRA variants (DoRA, aLoRA, ...) and
initialisations from the weight (PiSSA, OLoRA, LoftQ, CorDA, ...).
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as _peft_get_peft_model
from peft import prepare_model_for_kbit_training as _peft_prepare_model_for_kbit_training
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..module_swap import linear_weight
from ..modules import QuantizedLinear

ALL_LINEAR = "all-linear"
# init_lora_weights values that initialise the adapter without reading the base weight.
WEIGHT_FREE_INITS = (True, False, "gaussian")


class QuantizedLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` around a ``QuantizedLinear``: y = base(x) + B(A(dropout(x))) * scaling."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # the quantized weight is [out, in], even for a transformers Conv1D
        self.layer_name = kwargs.get("target_name") or type(base_layer).__name__  # for errors

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features  # PEFT's generic lookup warns for layers it does not know

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        name = kwargs.get("target_name") or adapter_name
        init = config.init_lora_weights
        if init not in WEIGHT_FREE_INITS:
            raise ValueError(
                f"LoRA layer {name!r}: init_lora_weights={init!r} initialises the adapter from the base weight, "
                f"which qpass holds quantized; use one of {WEIGHT_FREE_INITS} (or initialise on the "
                "full-precision model, then quantize the residual with qpass)")
        try:
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        except _UnsupportedVariant as err:
            raise ValueError(
                f"LoRA layer {name!r}: {err} reads the base weight, which qpass holds quantized; qpass layers take "
                "plain LoRA (with rsLoRA, dropout and lora_bias): set use_dora=False and leave the variant out"
            ) from None

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise _UnsupportedVariant(type(variant).__name__)
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B @ A * scaling`` in float32, ``[out_features, in_features]``."""
        weight_a = self.lora_A[adapter].weight.float()
        weight_b = self.lora_B[adapter].weight.float()
        return (weight_b @ weight_a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active adapters (or ``adapter_names``) into the quantized weight, one re-quantization
        each. A merged weight with NaN/Inf is always refused, the layer left as it was, so ``safe_merge``
        changes nothing."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            if isinstance(self.get_base_layer(), QuantizedLinear):
                # One message per adapter, not per layer: Python's default filter then shows it once for a
                # whole merge_and_unload rather than once for each of a model's hundreds of layers.
                warnings.warn(f"merging LoRA adapter {adapter!r} into qpass-quantized layers re-quantizes their "
                              "weights: changes smaller than the format's step are rounded away (examples/qlora.py "
                              "measures how much); keep adapters unmerged, or qpass.dequantize the model first, to "
                              "keep all they learned", stacklevel=2)
            self._add_to_base(adapter, sign=1.0)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters again: into a quantized base, within a re-quantization of the
        weight before merging, not its original bytes."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._add_to_base(adapter, sign=-1.0)

    def _add_to_base(self, adapter: str, sign: float) -> None:
        """Checks first, then changes the layer: a refused merge leaves it as it was. The base is quantized,
        or full precision after ``qpass.dequantize``: then the delta is added to its weight as it is."""
        base = self.get_base_layer()
        quantized = isinstance(base, QuantizedLinear)
        current = base.dequantize(torch.float32) if quantized else linear_weight(base)  # [out, in]
        weight = current.float() + sign * self.get_delta_weight(adapter).to(current.device)
        if not torch.isfinite(weight).all():
            raise ValueError(f"LoRA layer {self.layer_name!r}: adapter {adapter!r} makes the weight NaN/Inf; the "
                             "adapter is broken (the layer is left as it was)")
        if self.lora_bias[adapter] and base.bias is None:
            raise ValueError(f"LoRA layer {self.layer_name!r}: adapter {adapter!r} has a lora_bias but the layer "
                             "has no bias to merge it into")
        if quantized:
            base.requantize_(weight, name=self.layer_name)
        else:
            with torch.no_grad():
                current.copy_(weight)  # linear_weight is a view: a Conv1D's [in, out] weight is written through it
        if self.lora_bias[adapter]:
            lora_bias = self.lora_B[adapter].bias.detach() * self.scaling[adapter]  # scaled, as in forward
            base.bias.data += sign * lora_bias.to(base.bias.dtype)


class _UnsupportedVariant(Exception):
    """A LoRA variant that would read the packed weight (raised inside PEFT's update_layer)."""


def linear_layer_names(model: nn.Module) -> set[str]:
    """Names of the linear layers LoRA can target: ``QuantizedLinear``, ``nn.Linear`` and transformers'
    ``Conv1D``, also where PEFT already wraps them (not the layers inside a wrapper: its base layer and
    adapters), without the model's output embedding."""
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names, wrappers = set(), []
    for name, module in model.named_modules():
        if any(name.startswith(wrapper + ".") for wrapper in wrappers):
            continue
        base = module
        if isinstance(module, BaseTunerLayer):
            wrappers.append(name)
            base = module.get_base_layer()
        if base is output_embedding:
            continue
        if isinstance(base, QuantizedLinear) or linear_weight(base) is not None:
            names.add(name)
    return names


def prepare_lora_config(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """A copy of ``config`` that PEFT can apply to ``model``'s ``QuantizedLinear`` layers:
    ``QuantizedLoraLinear`` registered for them, and ``"all-linear"`` spelled out as layer names."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"qpass supports LoRA adapters (peft.LoraConfig), got {type(config).__name__}")
    config = copy.deepcopy(config)
    if isinstance(model, PeftModel):  # a second adapter: PEFT matches names within the base model
        model = model.get_base_model()
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        names = linear_layer_names(model)
        if not names:
            raise ValueError(f"target_modules={ALL_LINEAR!r}: the model has no linear layer besides its output "
                             "embedding; name the modules to adapt")
        config.target_modules = names
    config._register_custom_module({QuantizedLinear: QuantizedLoraLinear})
    return config


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """``peft.prepare_model_for_kbit_training`` for a qpass model (a transformers model): every parameter
    frozen, fp16/bf16 ones (norms, embeddings) cast to float32, and gradient checkpointing turned on,
    which PEFT does only for the quantizers it knows by name. Checkpoints are non-reentrant unless
    ``gradient_checkpointing_kwargs`` says ``use_reentrant=True`` (torch asks for an explicit choice)."""
    model = _peft_prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:  # reentrant checkpoints need an input that requires grad
            model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # deprecated from 5.23 on, removed in 6
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of a PEFT model as ``PeftModel.get_nb_trainable_parameters`` counts them,
    with each ``QuantizedLinear``'s frozen weight counted as its ``out_features * in_features`` weights
    (PEFT counts the elements of the packed parameter, half as many for 4-bit codes, or none when the
    packed codes are a buffer; it counts bitsandbytes' packed 4-bit parameters as their unpacked number
    the same way). The total is then the unquantized model's."""
    trainable, total = PeftModel.get_nb_trainable_parameters(model)
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            packed = layer.packed_weight_parameter
            total += layer.out_features * layer.in_features - (packed.numel() if packed is not None else 0)
    return trainable, total


def _counting_quantized_weights(model: PeftModel) -> PeftModel:
    """``model`` whose ``get_nb_trainable_parameters`` (and so ``print_trainable_parameters``, which trainers
    log) is ``count_parameters``. A partial, not a bound method, so that the model still pickles
    (``torch.save(model)``) and deep-copies with it."""
    model.get_nb_trainable_parameters = functools.partial(count_parameters, model)
    return model


def get_peft_model(model: nn.Module, config: LoraConfig, **kwargs) -> PeftModel:
    """``peft.get_peft_model`` with ``prepare_lora_config(config, model)``; ``print_trainable_parameters``
    counts the quantized weights (``count_parameters``)."""
    return _counting_quantized_weights(_peft_get_peft_model(model, prepare_lora_config(config, model), **kwargs))


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False,
                 **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained(model, path)`` for a qpass model: the saved ``LoraConfig`` with
    ``prepare_lora_config`` applied, counting parameters as ``get_peft_model``'s."""
    config = prepare_lora_config(LoraConfig.from_pretrained(path), model)
    return _counting_quantized_weights(PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs))
