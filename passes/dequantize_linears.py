"""Graph pass: the inverse of ``quantize_linears``. Each qpass linear op of an ``ExportedProgram``
becomes ``aten.linear`` with its weight decoded into a parameter.

For each packed weight, the pass decodes the layer's quantized tensors with the same
``Layout.dequantize`` the module front-end uses (``QuantizedLinear.dequantize``), binds the result to a
new frozen parameter under the packed weight's name (``<module>.weight``, ``[out_features,
in_features]``, also for a layer that was a transformers ``Conv1D``), replaces every call by
``aten.linear(x, weight, bias)``, and drops the quantized tensors no other node reads.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from qpass.module_swap import majority_floating_dtype

from .program_edit import QuantizedLinearNode, copy_graph_module, input_tensors, quantized_linear_nodes

aten = torch.ops.aten


def dequantize_exported_program(ep: ExportedProgram, dtype: torch.dtype | None = None) -> ExportedProgram:
    """A new ``ExportedProgram`` computing each quantized linear in full precision; ``ep`` is unchanged.

    The weights are the quantized ones decoded (quantization error stays), in ``dtype``: by default the
    dtype holding most elements of the program's other floating-point parameters, as
    ``qpass.dequantize`` chooses for a module, else each layer's compute dtype. Where a layer's input or
    bias has another dtype, it is cast to the weight's, and the result back to the input's dtype, as
    the quantized op did.
    """
    gm = copy_graph_module(ep.graph_module)
    graph = gm.graph
    found = quantized_linear_nodes(ep, graph)
    if not found:
        return ep
    values = input_tensors(ep)
    quantized_inputs = {t for q in found for t in (*q.call.tensors.values(), q.call.bias) if t is not None}
    if dtype is None:
        params = ep.graph_signature.inputs_to_parameters
        dtype = majority_floating_dtype(values[n.name] for n in graph.nodes
                                        if n.op == "placeholder" and n.name in params and n not in quantized_inputs)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])

    weights: dict[fx.Node, fx.Node] = {}  # packed weight placeholder -> decoded weight placeholder
    new_params: dict[str, tuple[fx.Node, torch.Tensor]] = {}  # target -> (placeholder, decoded weight)
    for q in found:
        packed = q.call.tensors["weight"]
        if packed not in weights:
            weight = _decoded_weight(q, values, dtype)
            with graph.inserting_before(next(iter(graph.nodes))):  # ordered with the others below
                weights[packed] = graph.placeholder(_placeholder_name(q.layer))
            weights[packed].meta["val"] = fake_mode.from_tensor(weight, static_shapes=True) if fake_mode else weight
            new_params[f"{q.layer}.weight"] = weights[packed], weight
        _replace_by_linear(q, weights[packed], graph, fake_mode)
    for packed in weights:  # its name goes to the decoded weight, so nothing else may read it
        if packed.users:
            layer = next(q.layer for q in found if q.call.tensors["weight"] is packed)
            raise ValueError(f"layer {layer!r}: its packed weight is also read by {next(iter(packed.users))}, "
                             "not a qpass linear op; cannot dequantize this program")

    # The quantized tensors no node reads now leave the program, under every name they had (export
    # lifts a code book shared by many layers once per name, and only one of those is read); the
    # decoded weights take the packed weights' names.
    layer_tensors = {f"{q.layer}.{name}" for q in found for name in q.call.layout.tensor_names}
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    unread = set()
    for spec in ep.graph_signature.input_specs:
        node = placeholders.get(getattr(spec.arg, "name", None))
        if node is not None and (node in quantized_inputs or spec.target in layer_tensors) and not node.users:
            unread.add(node.name)
    state_dict, constants = dict(ep.state_dict), dict(ep.constants)
    specs = []
    for spec in ep.graph_signature.input_specs:
        if spec.arg.name in unread:
            state_dict.pop(spec.target, None)
            constants.pop(spec.target, None)
            graph.erase_node(placeholders[spec.arg.name])
        else:
            specs.append(spec)
    taken = {n.name for n in graph.nodes}
    for target, (node, weight) in new_params.items():
        state_dict[target] = torch.nn.Parameter(weight, requires_grad=False)
        if _placeholder_name(target.removesuffix(".weight")) not in taken:  # the packed weight's, if it had it
            node.name = _placeholder_name(target.removesuffix(".weight"))

    # New parameters go after the existing ones, as torch.export orders its inputs.
    first_other = next((i for i, s in enumerate(specs) if s.kind != InputKind.PARAMETER), len(specs))
    new_specs = [InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target)
                 for target, (node, _) in new_params.items()]
    specs = specs[:first_other] + new_specs + specs[first_other:]
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    _order_placeholders(graph, [placeholders[s.arg.name] for s in specs])
    graph.lint()
    gm.recompile()
    signature = ExportGraphSignature(input_specs=specs, output_specs=list(ep.graph_signature.output_specs))
    return ep._update(gm, signature, state_dict=state_dict, constants=constants)


def _placeholder_name(layer: str) -> str:
    return f"p_{layer.replace('.', '_')}_weight"  # torch.export's name for parameter <layer>.weight


def _decoded_weight(q: QuantizedLinearNode, values: dict[str, torch.Tensor], dtype: torch.dtype | None):
    tensors = {}
    for name, node in q.call.tensors.items():
        if node is not None and node.name not in values:
            raise ValueError(f"layer {q.layer!r}: its quantized tensor {name!r} is computed in the graph "
                             f"({node.format_node()}), not stored in the program; cannot dequantize it")
        tensors[name] = None if node is None else values[node.name]
    return q.call.layout.dequantize(tensors, dtype or q.call.layout.config.compute_dtype)


def _replace_by_linear(q: QuantizedLinearNode, weight: fx.Node, graph: fx.Graph, fake_mode) -> None:
    """``aten.linear(x, weight, bias)`` in place of ``q.node``, with casts where dtypes differ."""
    x, bias, node = q.call.x, q.call.bias, q.node
    dtype = weight.meta["val"].dtype
    with graph.inserting_before(node):
        x_in = _cast(graph, x, dtype, node, fake_mode)
        bias_in = None if bias is None else _cast(graph, bias, dtype, node, fake_mode)
        out = _call(graph, aten.linear.default, (x_in, weight, bias_in), {}, node, fake_mode)
        out = _cast(graph, out, x.meta["val"].dtype, node, fake_mode)
    node.replace_all_uses_with(out)
    name = node.name
    graph.erase_node(node)
    out.name = name  # output specs refer to the replaced node by name


def _cast(graph: fx.Graph, value: fx.Node, dtype: torch.dtype, like: fx.Node, fake_mode) -> fx.Node:
    if value.meta["val"].dtype == dtype:
        return value
    return _call(graph, aten._to_copy.default, (value,), {"dtype": dtype}, like, fake_mode)


def _call(graph: fx.Graph, op, args: tuple, kwargs: dict, like: fx.Node, fake_mode) -> fx.Node:
    """A node calling ``op``, with ``like``'s metadata (module stack, source) and its own value."""
    node = graph.call_function(op, args, kwargs)
    node.meta = {k: v for k, v in like.meta.items() if k != "val"}
    vals = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        node.meta["val"] = op(*vals[0], **vals[1])
    return node


def _order_placeholders(graph: fx.Graph, ordered: list[fx.Node]) -> None:
    """Move the placeholders into ``ordered`` order (the signature's), before every other node."""
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for node in ordered:
        anchor.prepend(node)
