"""Graph pass: the inverse of ``quantize_linears``. Each qpass linear op of an ``ExportedProgram``
becomes ``aten.linear`` with its weight decoded into a parameter.

For each packed weight, the pass decodes the layer's quantized tensors with the same
``Layout.dequantize`` the module front-end uses (``QuantizedLinear.dequantize``), binds the result to a
new frozen parameter under the packed weight's name (``<module>.weight``, ``[out_features,
in_features]``, also for a layer that was a transformers ``Conv1D``; a bare parameter, such as
``nn.MultiheadAttention``'s ``in_proj_weight``, gets its own name back), in the place the quantizing
pass took it from, replaces every call by
``aten.linear(x, weight, bias)``, and drops the quantized tensors no other node reads.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from qpass.module_swap import majority_floating_dtype

from .program_edit import ProgramEdit, QuantizedLinearNode, input_tensors, quantized_linear_nodes
from .quantize_linears import PARAMETER_KEY

aten = torch.ops.aten


def dequantize_exported_program(ep: ExportedProgram, dtype: torch.dtype | None = None) -> ExportedProgram:
    """A new ``ExportedProgram`` computing each quantized linear in full precision; ``ep`` is unchanged.

    The weights are the quantized ones decoded (quantization error stays), in ``dtype``: by default the
    dtype holding most elements of the program's other floating-point parameters, as
    ``qpass.dequantize`` chooses for a module, else each layer's compute dtype. Where a layer's input or
    bias has another dtype, it is cast to the weight's, and the result back to the input's dtype, as
    the quantized op did.
    """
    if not quantized_linear_nodes(ep, ep.graph):
        return ep
    edit = ProgramEdit(ep)
    graph = edit.graph
    found = quantized_linear_nodes(ep, graph)
    values = input_tensors(ep)
    quantized_inputs = {t for q in found for t in (*q.call.tensors.values(), q.call.bias) if t is not None}
    if dtype is None:
        params = ep.graph_signature.inputs_to_parameters
        dtype = majority_floating_dtype(values[name] for name, node in edit.placeholders.items()
                                        if name in params and node not in quantized_inputs)

    weights: dict[fx.Node, fx.Node] = {}  # packed weight placeholder -> decoded weight placeholder
    for q in found:
        packed = q.call.tensors["weight"]
        if packed not in weights:
            weight = _decoded_weight(q, values, dtype)
            original = (q.node.meta.get("custom") or {}).get(PARAMETER_KEY, {})  # none from a module's export
            weights[packed] = edit.add_input(InputKind.PARAMETER, original.get("name", f"{q.layer}.weight"), weight,
                                             before=original.get("before"))
        _replace_by_linear(q, weights[packed], graph, edit.fake_mode)
    for packed in weights:  # its name goes to the decoded weight, so nothing else may read it
        if packed.users:
            layer = next(q.layer for q in found if q.call.tensors["weight"] is packed)
            raise ValueError(f"layer {layer!r}: its packed weight is also read by {next(iter(packed.users))}, "
                             "not a qpass linear op; cannot dequantize this program")

    # The quantized tensors no node reads now leave the program, under every name they had (export
    # lifts a code book shared by many layers once per name, and only one of those is read).
    layer_tensors = {f"{q.layer}.{name}" for q in found for name in q.call.layout.tensor_names}
    for spec in ep.graph_signature.input_specs:
        node = edit.placeholders.get(getattr(spec.arg, "name", None))
        if node is not None and (node in quantized_inputs or spec.target in layer_tensors) and not node.users:
            edit.remove_input(node)
    return edit.program()


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
    """A node calling ``op``, with ``like``'s metadata (module stack, source; not the replaced
    parameter the quantizing pass kept) and its own value."""
    node = graph.call_function(op, args, kwargs)
    node.meta = {k: v for k, v in like.meta.items() if k != "val"}
    custom = {k: v for k, v in (node.meta.pop("custom", None) or {}).items() if k != PARAMETER_KEY}
    if custom:
        node.meta["custom"] = custom
    vals = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        node.meta["val"] = op(*vals[0], **vals[1])
    return node
