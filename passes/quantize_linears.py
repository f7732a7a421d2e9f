"""Graph pass: rewrite the linear layers of an ``ExportedProgram`` into ``torch.ops.qpass`` ops.

For every parameter that ``find_linear_weights`` reports and the plan selects, the pass quantizes the
parameter with the same ``quantize_weight`` the module front-end uses, lifts the quantized tensors
into the program as persistent buffers named ``<module>.<tensor>`` (``<module>.weight``,
``<module>.absmax``, ... exactly the ``state_dict`` keys of ``QuantizedLinear``; for a bare parameter
``<name>`` not ending in ``.weight``, the layer is ``<name>``), replaces each use by
the format's linear op, and drops the original parameter from the state dict and the signature.
"""

from __future__ import annotations

import copy
import dataclasses

from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from qpass.config import QPassConfig
from qpass.formats import quantize_layer
from qpass.fused_experts import is_router, warn_unquantized_experts

from .linear_patterns import find_linear_weights
from .program_edit import ProgramEdit, quantized_linear_nodes


@dataclasses.dataclass
class QuantizedLinearReport:
    """What the pass changed: module name -> format name, for each quantized weight."""

    quantized: dict[str, str] = dataclasses.field(default_factory=dict)


# The parameter a layer's op replaced, kept in the op node's ``meta["custom"]`` (which torch.export saves
# and loads, and ``run_decompositions`` keeps) for dequantize_linears to put it back as it was:
# ``{"name": its target, "before": the parameter that followed it in the program, or None}``. The name
# matters for a bare parameter (``nn.MultiheadAttention``'s ``in_proj_weight``: the layer is
# ``self_attn.in_proj_weight``, its tensors ``self_attn.in_proj_weight.weight``, ...).
PARAMETER_KEY = "qpass_parameter"


def _module_name(parameter_fqn: str) -> str:
    return parameter_fqn.removesuffix(".weight")


def _in_router(match) -> bool:
    """Whether this linear op runs inside a mixture-of-experts router, which stays in full precision as in the
    module front-end (``qpass.fused_experts.is_router``)."""
    stack = match.node.meta.get("nn_module_stack") or {}
    return bool(stack) and is_router(list(stack.values())[-1][1])


def quantize_exported_program(ep: ExportedProgram, plan: QPassConfig) -> tuple[ExportedProgram, QuantizedLinearReport]:
    """A new ``ExportedProgram`` with the selected linear layers quantized; ``ep`` is left unchanged.
    The plan's skip list is resolved for the program as for a module (``QPassConfig.for_model``)."""
    plan = plan.for_model(ep)
    edit = ProgramEdit(ep)
    parameter_names = dict(ep.graph_signature.inputs_to_parameters)
    parameters = list(ep.graph_signature.parameters)
    following = dict(zip(parameters, parameters[1:]))
    report = QuantizedLinearReport()
    linear_weights = {node: matches for node, matches in find_linear_weights(edit.graph, parameter_names).items()
                      if not any(map(_in_router, matches))}
    if plan.overrides:
        layers = {_module_name(parameter_names[node.name]): None for node in linear_weights}
        layers.update((q.layer, None) for q in quantized_linear_nodes(ep, edit.graph))  # quantized before
        plan.warn_unmatched_overrides(layers, "this exported program")
    warn_unquantized_experts(ep.state_dict.items(), "this exported program")
    for weight_node, matches in linear_weights.items():
        fqn = parameter_names[weight_node.name]
        module = _module_name(fqn)
        config = plan.config_for(module)
        if config is None:
            continue
        weight = ep.state_dict[fqn]
        if matches[0].weight_is_transposed:
            weight = weight.t()
        layout, tensors = quantize_layer(weight, config, module)
        tensor_nodes = {name: None if tensors[name] is None
                        else edit.add_input(InputKind.BUFFER, f"{module}.{name}", tensors[name])
                        for name in layout.tensor_names}  # the packed weight takes over <module>.weight
        original = {"name": fqn, "before": following.get(fqn)}

        for match in matches:
            with edit.graph.inserting_before(match.node):
                op, args = layout.linear_call(match.x, tensor_nodes, match.bias)
                quantized = edit.graph.call_function(op, args)
            quantized.meta = copy.copy(match.node.meta)
            quantized.meta["custom"] = {**(quantized.meta.get("custom") or {}), PARAMETER_KEY: original}
            match.node.replace_all_uses_with(quantized)
            name = match.node.name
            edit.graph.erase_node(match.node)
            quantized.name = name  # output specs refer to the replaced node by name
            if match.transpose is not None and not match.transpose.users:
                edit.graph.erase_node(match.transpose)
        edit.remove_input(weight_node)
        report.quantized[module] = layout.config.format_name

    if not report.quantized:
        return ep, report
    return edit.program(), report
