"""Typed quantization configs and the per-module plan both front-ends resolve against.

A *format config* says how one weight is quantized (``NF4Config``, ``FP4Config``, ``Int8Config``);
a ``QPassConfig`` says which config each linear layer gets, by fully qualified module name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import ClassVar, Union

import torch
from torch.export import ExportedProgram

from .default_skips import DEFAULT_SKIP_MODULES, always_skipped_modules, default_skip_modules

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
QUANT_STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how configs and checkpoints write dtypes."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class QuantConfig:
    """Base of the format configs. Subclasses are frozen dataclasses that validate themselves."""

    format_name: ClassVar[str]
    version: ClassVar[int] = 1


def _check_dtype(value: torch.dtype, allowed: Sequence[torch.dtype], field: str, owner: str) -> None:
    if value not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise ValueError(f"{owner}: {field}={value} is not supported; use one of {names}")


@dataclasses.dataclass(frozen=True)
class Weight4bitConfig(QuantConfig):
    """Blockwise 4-bit weights (bitsandbytes ``Linear4bit``), the 4-bit code book given by the subclass.

    Fields, with their bitsandbytes / transformers ``BitsAndBytesConfig`` names:

    * ``blocksize`` (``bnb_4bit_blocksize``): weights per absmax, a power of two from 32 to 4096.
    * ``double_quant`` (``bnb_4bit_use_double_quant``): quantize the absmax values again to 8 bits in
      blocks of 256 (4.127 bits per weight instead of 4.5). On by default, as in the QLoRA recipe
      (bitsandbytes' own default is off).
    * ``compute_dtype`` (``bnb_4bit_compute_dtype``): dtype of the matmul; inputs are cast to it and the
      output is cast back to the input's dtype.
    * ``quant_storage`` (``bnb_4bit_quant_storage``): dtype the packed bytes are viewed as (uint8, or a
      float dtype for FSDP sharding); the bytes are the same.
    """

    quant_type: ClassVar[str]
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"{owner}: double_quant={self.double_quant!r} must be True or False")
        if self.blocksize not in VALID_BLOCKSIZES:
            raise ValueError(
                f"{owner}: blocksize={self.blocksize!r} is not supported; use a power of two from 32 to 4096 "
                f"({', '.join(map(str, VALID_BLOCKSIZES))})"
            )
        _check_dtype(self.compute_dtype, COMPUTE_DTYPES, "compute_dtype", owner)
        _check_dtype(self.quant_storage, QUANT_STORAGE_DTYPES, "quant_storage", owner)


@dataclasses.dataclass(frozen=True)
class NF4Config(Weight4bitConfig):
    """4-bit NormalFloat (``bnb_4bit_quant_type="nf4"``)."""

    format_name: ClassVar[str] = "nf4"
    quant_type: ClassVar[str] = "nf4"


@dataclasses.dataclass(frozen=True)
class FP4Config(Weight4bitConfig):
    """4-bit float, bitsandbytes' sign + 3-bit magnitude code (``bnb_4bit_quant_type="fp4"``)."""

    format_name: ClassVar[str] = "fp4"
    quant_type: ClassVar[str] = "fp4"


@dataclasses.dataclass(frozen=True)
class Int8Config(QuantConfig):
    """LLM.int8() (bitsandbytes ``Linear8bitLt``): int8 weights with one float32 scale per output row.

    * ``threshold`` (``llm_int8_threshold``): input columns holding any |x| >= threshold are computed
      in ``compute_dtype`` against the dequantized weights; 0 turns this outlier path off.
    * ``compute_dtype``: dtype of the outlier matmul and of the result before it is cast back to the
      input's dtype.
    """

    format_name: ClassVar[str] = "int8"
    threshold: float = 6.0
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"Int8Config: threshold={self.threshold!r} must be a finite number >= 0 "
                             "(0 disables outliers)")
        _check_dtype(self.compute_dtype, COMPUTE_DTYPES, "compute_dtype", "Int8Config")


FORMATS: dict[str, type[QuantConfig]] = {cls.format_name: cls for cls in (NF4Config, FP4Config, Int8Config)}

ConfigLike = Union[str, QuantConfig, Mapping, None]
BNB_QUANT_METHOD = "bitsandbytes"  # quantization_config.quant_method of transformers' BitsAndBytesConfig


def as_quant_config(spec: ConfigLike) -> QuantConfig | None:
    """A format config from a format name ("nf4", "fp4", "int8"), a config object, the dict
    ``config_to_dict`` writes, or None (= skip)."""
    if spec is None or isinstance(spec, QuantConfig):
        return spec
    if isinstance(spec, Mapping):
        return config_from_dict(spec)
    if isinstance(spec, str):
        try:
            return FORMATS[spec.lower()]()
        except KeyError:
            raise ValueError(
                f"unknown quantization format {spec!r}; use one of {sorted(FORMATS)} or a config object "
                "such as qpass.NF4Config(blocksize=128)"
            ) from None
    if is_bitsandbytes_config(spec):
        raise TypeError("a BitsAndBytesConfig is a whole plan (it has skip modules): give it as the plan, "
                        "qpass.quantize(model, bnb_config), or as QPassConfig.from_bitsandbytes(bnb_config)")
    raise TypeError(f"expected a format name, a qpass config or None, got {type(spec).__name__}")


QPASS_QUANT_METHOD = "qpass"  # quantization_config.quant_method of plans and of mixed-format checkpoints


@dataclasses.dataclass
class QPassConfig:
    """Which format each linear layer gets.

    * ``default``: the format of every linear layer not named below.
    * ``overrides``: ``{name_or_glob: format}`` by fully qualified module name, e.g.
      ``{"*.self_attn.*": "int8", "model.layers.0.mlp.down_proj": None}`` (None leaves it in full
      precision). An exact name wins over globs; among globs the first match wins.
    * ``skip_modules``: names or globs never quantized, whatever the overrides say. None (the default)
      leaves out what transformers + bitsandbytes leave out by default: in a transformers model, its
      output layer (``get_output_embeddings()``) and the layer holding its last parameter (a
      classifier head such as ``score``, which a checkpoint of the base model lacks); in any other
      module, the layers named ``lm_head``. A list replaces that default, as ``llm_int8_skip_modules``
      does. Either way a transformers model's ``_keep_in_fp32_modules`` stay unquantized (as
      bitsandbytes leaves them), and so do output layers tied to an input embedding.

      An ``ExportedProgram`` of a transformers model gets the same rule from what ``torch.export``
      recorded (``qpass.default_skips``), with its output layer known by name (``lm_head``); a program
      of a transformers-model subclass defined outside transformers gets it only in a process that has
      imported that subclass' module, and the ``lm_head`` default otherwise.
    * ``skip_offloaded``: loading through transformers with a ``device_map`` dict, leave in full precision
      the modules it offloads (to the disk, or to the CPU beside an accelerator), for accelerate to offload
      as usual: bitsandbytes' ``llm_int8_enable_fp32_cpu_offload``. Without it such a map is refused when
      it offloads a quantized layer. No effect elsewhere (``qpass.quantize`` places nothing).
    """

    default: ConfigLike = "nf4"
    overrides: Mapping[str, ConfigLike] = dataclasses.field(default_factory=dict)
    skip_modules: Sequence[str] | None = None
    skip_offloaded: bool = False

    def __post_init__(self) -> None:
        self.default = as_quant_config(self.default)
        self.overrides = {pattern: as_quant_config(spec) for pattern, spec in self.overrides.items()}
        if isinstance(self.skip_modules, str):
            self.skip_modules = (self.skip_modules,)
        if self.skip_modules is not None:
            self.skip_modules = tuple(self.skip_modules)

    @property
    def quant_method(self) -> str:
        """"qpass": how transformers' ``from_pretrained(..., quantization_config=...)`` finds qpass'
        quantizer, which is registered here, when transformers first asks."""
        from .integrations.transformers import register

        register()
        return QPASS_QUANT_METHOD

    def to_dict(self) -> dict:
        """JSON-ready form (transformers writes it into config.json)."""

        return {"quant_method": QPASS_QUANT_METHOD, "default": config_to_dict(self.default),
                "overrides": {k: config_to_dict(v) for k, v in self.overrides.items()},
                "skip_modules": None if self.skip_modules is None else list(self.skip_modules),
                "skip_offloaded": self.skip_offloaded}

    @classmethod
    def from_bitsandbytes(cls, config) -> QPassConfig:
        """The plan that quantizes as transformers' ``BitsAndBytesConfig`` ``config`` (or its ``to_dict()``)
        does, to the same bytes: ``load_in_4bit`` gives ``NF4Config``/``FP4Config`` by
        ``bnb_4bit_quant_type`` with its double quantization, compute and storage dtypes (blocksize 64,
        as bitsandbytes); ``load_in_8bit`` gives ``Int8Config(threshold=llm_int8_threshold,
        compute_dtype=float16)``, bitsandbytes' int8 arithmetic. ``llm_int8_skip_modules`` becomes
        ``skip_modules`` (left out, the same default), and ``llm_int8_enable_fp32_cpu_offload`` becomes
        ``skip_offloaded``. Its defaults are bitsandbytes' own, not qpass': FP4, no double quantization,
        float32 compute.

        ``llm_int8_has_fp16_weight`` (int8 weights trained in fp16) is refused: qpass' weights are frozen."""
        fields = _bitsandbytes_fields(config)
        if fields.get("llm_int8_has_fp16_weight"):
            raise ValueError("BitsAndBytesConfig(llm_int8_has_fp16_weight=True) keeps int8 weights in fp16 to train "
                             "them, and qpass' quantized weights are frozen (train adapters: qpass.integrations.peft); "
                             "set it to False")
        return cls(default=format_from_bitsandbytes(fields), skip_modules=fields.get("llm_int8_skip_modules"),
                   skip_offloaded=bool(fields.get("llm_int8_enable_fp32_cpu_offload")))

    @classmethod
    def from_dict(cls, config_dict: Mapping, return_unused_kwargs: bool = False, **kwargs):
        """The plan ``to_dict`` wrote, or the ``quantization_config`` of a qpass checkpoint with several
        formats (``{"quant_method": "qpass", "layers": {layer name: format dict}, ...}``, see
        ``checkpoints.bnb_layout.quantization_config``), read as exact-name overrides with nothing else
        quantized. transformers builds the config of a checkpoint's ``config.json`` this way."""
        fields = dict(config_dict)
        if fields.pop("quant_method", QPASS_QUANT_METHOD) != QPASS_QUANT_METHOD:
            raise ValueError(f"not a qpass quantization config: {dict(config_dict)}")
        if "layers" in fields:
            plan = cls(default=None, overrides=fields["layers"], skip_modules=())
        else:
            plan = cls(default=fields.get("default"), overrides=fields.get("overrides", {}),
                       skip_modules=fields.get("skip_modules"), skip_offloaded=fields.get("skip_offloaded", False))
        return (plan, kwargs) if return_unused_kwargs else plan

    def to_json_string(self, use_diff: bool = True) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def for_model(self, model: torch.nn.Module | ExportedProgram) -> QPassConfig:
        """This plan with ``skip_modules`` made concrete for ``model``, a module or an exported program:
        the default resolved, and a transformers model's ``_keep_in_fp32_modules`` added (see the class
        docstring and ``qpass.default_skips``)."""
        skips = default_skip_modules(model) if self.skip_modules is None else self.skip_modules
        return dataclasses.replace(self, skip_modules=(*skips, *always_skipped_modules(model)))

    def config_for(self, module_name: str) -> QuantConfig | None:
        """The format config for the module ``module_name``, or None to leave it in full precision.
        Resolve the plan with ``for_model`` first where the model is at hand: without it, the default
        skip list is ``["lm_head"]``."""
        skips = DEFAULT_SKIP_MODULES if self.skip_modules is None else self.skip_modules
        if any(_matches(module_name, pattern) for pattern in skips):
            return None
        if module_name in self.overrides:
            return self.overrides[module_name]
        for pattern, config in self.overrides.items():
            if _matches(module_name, pattern):
                return config
        return self.default

    def warn_unmatched_overrides(self, layers: Mapping[str, str | None], model_name: str) -> None:
        """Warn of each override that names no layer qpass quantizes in ``model_name``, most likely a typo
        that would leave its layers in the default format unnoticed. ``layers``: every linear layer of the
        model by name, with None for one a plan may quantize (or already quantized), else why it stays in
        full precision whatever the plan says. An override matching only layers that ``skip_modules``
        leaves out is not warned of: the skip list wins by design."""
        for pattern in self.overrides:
            matched = [name for name in layers if _matches(name, pattern)]
            if any(layers[name] is None for name in matched):
                continue
            if matched:
                why = "; ".join(f"{name!r}: {layers[name]}" for name in matched[:3])
                more = f" (and {len(matched) - 3} more)" if len(matched) > 3 else ""
                message = (f"qpass: the override {pattern!r} has no effect on {model_name}: the layers it matches "
                           f"stay in full precision whatever the plan says ({why}{more})")
            else:
                example = next((name for name, reason in layers.items() if reason is None), None)
                hint = f", such as {example!r}" if example else ""
                message = (f"qpass: the override {pattern!r} matches no linear layer of {model_name}; overrides "
                           f"name layers by their full module name{hint}, or by a glob of it")
            warnings.warn(message, UserWarning, stacklevel=2)


def config_to_dict(config: QuantConfig | None) -> dict | None:
    """JSON-ready ``{"format": name, field: value, ...}`` (dtypes by name) of a format config."""
    if config is None:
        return None
    fields = {k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in vars(config).items()}
    return {"format": config.format_name, **fields}


def field_defaults(config_type: type[QuantConfig]) -> dict[str, object]:
    """``{field: default}`` of a format config class: the fields ``config_from_dict`` reads, and the
    types the command line reads their values as."""
    return {f.name: f.default for f in dataclasses.fields(config_type)}


def config_from_dict(fields: Mapping) -> QuantConfig:
    """The format config of ``{"format": name, field: value, ...}``, as ``config_to_dict`` writes it
    (dtypes by name). Unknown formats and fields are errors, not ignored."""
    fields = dict(fields)
    name = fields.pop("format", None)
    cls = FORMATS.get(name)
    if cls is None:
        raise ValueError(f"unknown quantization format {name!r} in {dict(fields, format=name)}; qpass knows "
                         f"{sorted(FORMATS)}")
    defaults = field_defaults(cls)
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))} (fields: {sorted(defaults)})")
    return cls(**{k: dtype_from_name(v) if isinstance(defaults[k], torch.dtype) else v for k, v in fields.items()})


def is_bitsandbytes_config(spec) -> bool:
    """Whether ``spec`` is a transformers ``BitsAndBytesConfig`` or the ``quantization_config`` dict of one."""
    if spec is None or isinstance(spec, (str, QuantConfig, QPassConfig)):
        return False  # QPassConfig.quant_method registers qpass with transformers: not asked here
    method = spec.get("quant_method") if isinstance(spec, Mapping) else getattr(spec, "quant_method", None)
    return method == BNB_QUANT_METHOD  # transformers' QuantizationMethod is a str enum


def format_from_bitsandbytes(config) -> QuantConfig:
    """The format config of a ``BitsAndBytesConfig``, its ``to_dict()`` or a bitsandbytes checkpoint's
    ``quantization_config`` (``QPassConfig.from_bitsandbytes`` has the mapping). A checkpoint qpass wrote
    in int8 also records its compute dtype (``qpass_int8_compute_dtype``)."""
    fields = _bitsandbytes_fields(config)
    load_4bit, load_8bit = bool(fields.get("load_in_4bit")), bool(fields.get("load_in_8bit"))
    if load_4bit == load_8bit:
        raise ValueError(f"a bitsandbytes config sets exactly one of load_in_4bit and load_in_8bit; this one sets "
                         f"load_in_4bit={load_4bit}, load_in_8bit={load_8bit}")
    if load_8bit:
        return Int8Config(threshold=float(fields.get("llm_int8_threshold", 6.0)),
                          compute_dtype=dtype_from_name(fields.get("qpass_int8_compute_dtype") or "float16"))
    quant_type = fields.get("bnb_4bit_quant_type") or "fp4"
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type={quant_type!r} is not one bitsandbytes knows; use 'nf4' or 'fp4'")
    return FORMATS[quant_type](double_quant=bool(fields.get("bnb_4bit_use_double_quant", False)),
                               compute_dtype=_dtype_field(fields.get("bnb_4bit_compute_dtype"), torch.float32),
                               quant_storage=_dtype_field(fields.get("bnb_4bit_quant_storage"), torch.uint8))


def _bitsandbytes_fields(config) -> dict:
    fields = dict(config) if isinstance(config, Mapping) else config.to_dict() if hasattr(config, "to_dict") else None
    if fields is None or not is_bitsandbytes_config(fields):
        raise ValueError(f"expected a transformers BitsAndBytesConfig or its dict, got {config!r}")
    return fields


def _dtype_field(value, default: torch.dtype) -> torch.dtype:
    """A dtype field of a bitsandbytes config: a torch.dtype, its name ("bfloat16", "torch.bfloat16"), or None."""
    if value is None:
        return default
    return value if isinstance(value, torch.dtype) else dtype_from_name(value)


def _matches(module_name: str, pattern: str) -> bool:
    """Exact name, glob on the full name, or (for a bare name like "lm_head") the last component."""
    if module_name == pattern or fnmatch.fnmatchcase(module_name, pattern):
        return True
    return "." not in pattern and not any(c in pattern for c in "*?[") and module_name.rsplit(".", 1)[-1] == pattern


def as_plan(spec: ConfigLike | QPassConfig, **plan_options) -> QPassConfig:
    """A ``QPassConfig`` from whatever ``qpass.quantize`` was given."""
    if is_bitsandbytes_config(spec):
        spec = QPassConfig.from_bitsandbytes(spec)
    if isinstance(spec, QPassConfig):
        if plan_options:
            return dataclasses.replace(spec, **plan_options)
        return spec
    if spec is None:
        raise ValueError("qpass.quantize needs a format: 'nf4', 'fp4', 'int8', a config object or a QPassConfig")
    return QPassConfig(default=spec, **plan_options)
