"""``qpass.quantize``: one entry point for modules and exported programs."""

from __future__ import annotations

from typing import TypeVar, overload

from torch import nn
from torch.export import ExportedProgram

from .config import ConfigLike, QPassConfig, as_plan
from .module_swap import quantize_module

M = TypeVar("M", bound=nn.Module)


@overload
def quantize(model: M, spec: ConfigLike | QPassConfig, **plan_options) -> M: ...
@overload
def quantize(model: ExportedProgram, spec: ConfigLike | QPassConfig, **plan_options) -> ExportedProgram: ...


def quantize(model, spec, **plan_options):
    """Quantize the linear layers of ``model`` to ``spec``.

    ``model``: an ``nn.Module`` (its ``nn.Linear`` / transformers ``Conv1D`` layers are replaced in place
    and the module is returned) or a ``torch.export.ExportedProgram`` (a new program is returned whose
    graph calls ``torch.ops.qpass`` ops). ``spec``: "nf4", "fp4", "int8", a config object
    (``NF4Config(blocksize=128)``) or a ``QPassConfig``. ``plan_options`` are ``QPassConfig`` fields:
    ``overrides={"*.self_attn.*": "int8"}``, ``skip_modules=["lm_head"]``.

    Layers already quantized are left as they are, so quantizing twice changes nothing.
    """
    plan = as_plan(spec, **plan_options)
    if isinstance(model, ExportedProgram):
        from .passes import quantize_exported_program

        return quantize_exported_program(model, plan)[0]
    if isinstance(model, nn.Module):
        return quantize_module(model, plan)
    raise TypeError(f"qpass.quantize takes an nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}")
