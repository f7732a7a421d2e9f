"""Graph pass: rewrite the linear layers of an ``ExportedProgram`` into ``torch.ops.qpass`` ops.

For every parameter that ``find_linear_weights`` reports and the plan selects, the pass quantizes the
parameter with the same ``quantize_weight`` the module front-end uses, lifts the quantized tensors
into the program as persistent buffers named ``<module>.<tensor>`` (``<module>.weight``,
``<module>.absmax``, ... exactly the ``state_dict`` keys of ``QuantizedLinear``), replaces each use by
the format's linear op, and drops the original parameter from the state dict and the signature.
"""

from __future__ import annotations

import copy
import dataclasses

from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from qpass.config import QPassConfig
from qpass.formats import quantize_layer

from .linear_patterns import find_linear_weights
from .program_edit import copy_graph_module


@dataclasses.dataclass
class QuantizedLinearReport:
    """What the pass changed: module name -> format name, for each quantized weight."""

    quantized: dict[str, str] = dataclasses.field(default_factory=dict)


def _module_name(parameter_fqn: str) -> str:
    return parameter_fqn.removesuffix(".weight")


def quantize_exported_program(ep: ExportedProgram, plan: QPassConfig) -> tuple[ExportedProgram, QuantizedLinearReport]:
    """A new ``ExportedProgram`` with the selected linear layers quantized; ``ep`` is left unchanged.
    The plan's skip list is resolved for the program as for a module (``QPassConfig.for_model``)."""
    plan = plan.for_model(ep)
    gm = copy_graph_module(ep.graph_module)
    graph = gm.graph
    state_dict = dict(ep.state_dict)
    input_specs = list(ep.graph_signature.input_specs)
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders.values()])
    report = QuantizedLinearReport()

    # New buffers go after the existing parameters and buffers, as torch.export orders its inputs.
    state_kinds = (InputKind.PARAMETER, InputKind.BUFFER)
    first_other = next((i for i, s in enumerate(input_specs) if s.kind not in state_kinds), len(input_specs))
    insert_point = (
        placeholders[input_specs[first_other].arg.name]
        if first_other < len(input_specs)
        else next(n for n in graph.nodes if n.op != "placeholder")
    )

    parameter_names = dict(ep.graph_signature.inputs_to_parameters)
    new_specs: list[InputSpec] = []
    removed_params: set[str] = set()
    for weight_node, matches in find_linear_weights(graph, parameter_names).items():
        fqn = parameter_names[weight_node.name]
        module = _module_name(fqn)
        config = plan.config_for(module)
        if config is None:
            continue
        weight = state_dict[fqn]
        if matches[0].weight_is_transposed:
            weight = weight.t()
        layout, tensors = quantize_layer(weight, config, module)
        del state_dict[fqn]  # before the new buffers: the packed weight takes over the name <module>.weight

        tensor_nodes = {}
        for tensor_name in layout.tensor_names:
            tensor = tensors[tensor_name]
            if tensor is None:
                tensor_nodes[tensor_name] = None
                continue
            target = f"{module}.{tensor_name}"
            with graph.inserting_before(insert_point):
                node = graph.placeholder(f"b_{target.replace('.', '_')}")
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
            state_dict[target] = tensor
            new_specs.append(InputSpec(InputKind.BUFFER, TensorArgument(node.name), target, persistent=True))
            tensor_nodes[tensor_name] = node

        for match in matches:
            with graph.inserting_before(match.node):
                op, args = layout.linear_call(match.x, tensor_nodes, match.bias)
                quantized = graph.call_function(op, args)
            quantized.meta = copy.copy(match.node.meta)
            match.node.replace_all_uses_with(quantized)
            name = match.node.name
            graph.erase_node(match.node)
            quantized.name = name  # output specs refer to the replaced node by name
            if match.transpose is not None and not match.transpose.users:
                graph.erase_node(match.transpose)
        graph.erase_node(weight_node)
        removed_params.add(weight_node.name)
        report.quantized[module] = layout.config.format_name

    if not report.quantized:
        return ep, report

    kept = [s for s in input_specs[:first_other] if s.arg.name not in removed_params]
    input_specs = kept + new_specs + input_specs[first_other:]
    # No eliminate_dead_code: it would also drop nodes whose effect is not their output, which FX
    # cannot tell from pure ones (transformers 4.57's masks call vmap, whose nesting level calls have no
    # users; without them the program fails at run time). What the rewrite leaves unused is erased above.
    graph.lint()
    gm.recompile()
    signature = ExportGraphSignature(input_specs=input_specs, output_specs=list(ep.graph_signature.output_specs))
    return ep._update(gm, signature, state_dict=state_dict), report
