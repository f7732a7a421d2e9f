"""The layers a plan leaves unquantized by default (``QPassConfig.skip_modules=None``), for either front-end.

The rule is transformers + bitsandbytes' own (``transformers.quantizers.base.get_keys_to_not_convert``,
and the bitsandbytes quantizer's ``_keep_in_fp32_modules``), applied when the model is a transformers
``PreTrainedModel``:

* its output layer, and the module holding its last parameter (a classifier head such as ``score``,
  which a checkpoint of the base model lacks);
* always, whatever the skip list: its ``_keep_in_fp32_modules`` (T5's ``wo``), matched as transformers'
  ``should_convert_module`` matches them (the name, a module under it, a name ending in it).

Any other model: the layers named ``lm_head``.

An ``nn.Module`` is asked directly. An ``ExportedProgram`` no longer has its model, so the same facts
are read off what ``torch.export`` recorded: the root module's class (the ``nn_module_stack`` metadata
of the graph's nodes, a qualified name such as
``transformers.models.llama.modeling_llama.LlamaForCausalLM``), and the parameter order of its graph
signature (the model's ``named_parameters`` order). Two differences, both documented in
``QPassConfig``: the output layer is known by its usual name, ``lm_head`` (``get_output_embeddings``
needs the model); and a class is resolved only from transformers or from a module this process has
already imported (reading a program never imports other code), so a subclass of a transformers model
defined elsewhere, in a process that has not imported it, gets the ``lm_head`` default.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Sequence

from torch import nn
from torch.export import ExportedProgram

OUTPUT_LAYER_NAME = "lm_head"  # an exported transformers LM's output layer, known by its usual name
DEFAULT_SKIP_MODULES = (OUTPUT_LAYER_NAME,)  # the default outside transformers models


def default_skip_modules(model: nn.Module | ExportedProgram) -> tuple[str, ...]:
    """The skip list that ``skip_modules=None`` stands for in ``model``."""
    if isinstance(model, ExportedProgram):
        if not _exported_transformers_classes(model):
            return DEFAULT_SKIP_MODULES
        return _transformers_rule((OUTPUT_LAYER_NAME,), model.graph_signature.parameters)
    if not _is_transformers_model(model):
        return DEFAULT_SKIP_MODULES
    output = model.get_output_embeddings()
    output_names = [name for name, module in model.named_modules() if output is not None and module is output]
    return _transformers_rule(output_names, [name for name, _ in model.named_parameters()])


def always_skipped_modules(model: nn.Module | ExportedProgram) -> tuple[str, ...]:
    """Globs of the layers left unquantized whatever the skip list: a transformers model's
    ``_keep_in_fp32_modules``. An exported one: those of every transformers model class in it (the
    union transformers 5 builds in ``post_init`` from the root and its sub-models)."""
    if isinstance(model, ExportedProgram):
        classes = _exported_transformers_classes(model)
        names = {name for cls in classes for name in getattr(cls, "_keep_in_fp32_modules", None) or ()}
    else:
        names = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if _is_transformers_model(model) else set()
    return tuple(pattern for name in sorted(names) for pattern in (name, f"{name}.*", f"*{name}"))


def _transformers_rule(output_layers: Iterable[str], parameter_names: Sequence[str]) -> tuple[str, ...]:
    """``get_keys_to_not_convert``, tied weights aside (qpass leaves those alone anyway): the output
    layers and the module holding the last parameter."""
    skips = list(output_layers)
    if parameter_names and "." in parameter_names[-1]:
        skips.append(parameter_names[-1].rpartition(".")[0])
    return tuple(dict.fromkeys(skips))  # an untied lm_head is often both


def _pretrained_model_type() -> type | None:
    # Only a model built by transformers can be one, so this never imports transformers itself.
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return getattr(modeling_utils, "PreTrainedModel", None)


def _is_transformers_model(model: nn.Module) -> bool:
    pretrained = _pretrained_model_type()
    return pretrained is not None and isinstance(model, pretrained)


def _exported_transformers_classes(ep: ExportedProgram) -> list[type]:
    """The transformers model classes of the modules ``ep`` was traced through, the root's first; empty
    unless the root module is one."""
    stacks = [stack.values() for node in ep.graph.nodes if (stack := node.meta.get("nn_module_stack"))]
    root = _resolve_class(next((kind for stack in stacks for path, kind in stack if path == ""), None))
    pretrained = _pretrained_model_type()
    if root is None or pretrained is None or not issubclass(root, pretrained):
        return []
    found = (_resolve_class(kind) for kind in dict.fromkeys(kind for stack in stacks for _, kind in stack))
    return [root, *(cls for cls in dict.fromkeys(found) if cls not in (None, root) and issubclass(cls, pretrained))]


def _resolve_class(module_type) -> type | None:
    """The class named by an ``nn_module_stack`` entry: a class (a program just traced) or its qualified
    name (a program loaded from a file). Names are looked up in modules already imported, and in
    transformers, which is imported for them; None where neither has it."""
    if module_type is None or isinstance(module_type, type):
        return module_type
    module_name, _, class_name = str(module_type).rpartition(".")
    module = sys.modules.get(module_name)
    if module is None and module_name.startswith("transformers."):
        try:
            module = importlib.import_module(module_name)
        except Exception:  # another transformers version, a missing optional dependency: not known here
            return None
    found = getattr(module, class_name, None)
    return found if isinstance(found, type) else None
