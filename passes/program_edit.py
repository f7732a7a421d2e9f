"""What the graph passes share: copying a program's graph, reading the tensors its inputs are bound to,
and the layers its qpass linear ops compute."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from qpass.formats import LinearCall, parse_linear_call

_STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy whose nodes keep their names (the graph signature refers to nodes by name, and
    copying renames a placeholder called e.g. ``input`` to ``input_1``)."""
    copied = copy.deepcopy(gm)
    for old, new in zip(gm.graph.nodes, copied.graph.nodes):
        if new.name != old.name:
            new.name = old.name
    copied.recompile()
    return copied


def input_tensors(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """``{placeholder name: tensor}`` for the program's parameters, buffers (persistent ones are in
    ``ep.state_dict``, the others in ``ep.constants``) and lifted constant tensors."""
    values = {**ep.constants, **ep.state_dict}
    return {spec.arg.name: values[spec.target] for spec in ep.graph_signature.input_specs if spec.kind in _STATE_KINDS}


@dataclasses.dataclass(frozen=True)
class QuantizedLinearNode:
    """A node calling a format's linear op, with its call taken apart and the layer's name: its packed
    weight's target without ``.weight`` (``model.layers.0.mlp.up_proj``), as both front-ends name it."""

    node: fx.Node
    call: LinearCall
    layer: str


def quantized_linear_nodes(ep: ExportedProgram, graph: fx.Graph) -> list[QuantizedLinearNode]:
    """The qpass linear ops of ``graph`` (``ep``'s graph or a copy of it), in graph order."""
    targets = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs if spec.kind in _STATE_KINDS}
    found = []
    for node in graph.nodes:
        call = parse_linear_call(node.target, _positional_args(node)) if node.op == "call_function" else None
        if call is not None:
            weight = call.tensors["weight"]
            layer = targets.get(getattr(weight, "name", None), str(weight)).removesuffix(".weight")
            found.append(QuantizedLinearNode(node, call, layer))
    return found


def _positional_args(node: fx.Node) -> tuple:
    """``node``'s arguments in schema order, keyword ones included (exported graphs pass an op's
    arguments positionally; a hand-edited graph may not)."""
    schema = getattr(node.target, "_schema", None)
    if not node.kwargs or schema is None:
        return tuple(node.args)
    rest = schema.arguments[len(node.args):]
    return (*node.args, *(node.kwargs[a.name] if a.name in node.kwargs else a.default_value for a in rest))
