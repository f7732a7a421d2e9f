"""What the graph passes share: an edit of a program's graph and lifted state (``ProgramEdit``), the
tensors its inputs are bound to, and the layers its qpass linear ops compute."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from qpass.formats import LinearCall, parse_linear_call

_STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
# torch.export's order of a program's inputs, which a new input keeps: after the last one of its kind.
_INPUT_ORDER = (InputKind.TOKEN, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR,
                InputKind.CUSTOM_OBJ, InputKind.USER_INPUT)
_NAME_PREFIX = {InputKind.PARAMETER: "p", InputKind.BUFFER: "b"}


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy whose nodes keep their names (the graph signature refers to nodes by name, and
    copying renames a placeholder called e.g. ``input`` to ``input_1``)."""
    copied = copy.deepcopy(gm)
    for old, new in zip(gm.graph.nodes, copied.graph.nodes):
        if new.name != old.name:
            new.name = old.name
    copied.recompile()
    return copied


class ProgramEdit:
    """A copy of ``ep``'s graph to rewrite, with the parameters and buffers the rewrite adds and removes;
    ``program()`` gives the new ``ExportedProgram`` (``ep`` is left unchanged).

    Added inputs are persistent state, named as torch.export names them (placeholder ``p_<target>`` or
    ``b_<target>``, dots as underscores, lower case) and placed before the input the pass names, else
    after the last input of their kind, so the program keeps torch.export's input order: parameters,
    buffers, constants, user inputs. A removed input leaves the signature, the graph and the state dict;
    its target may then be taken by an added one (a packed weight takes the name of the weight it
    replaces, and back)."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.graph_module = _copy_graph_module(ep.graph_module)
        self.graph = self.graph_module.graph
        self.placeholders = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in self.placeholders.values()])
        self._added: list[_AddedInput] = []
        self._removed: set[str] = set()

    def add_input(self, kind: InputKind, target: str, value: torch.Tensor, before: str | None = None) -> fx.Node:
        """A placeholder for a new parameter or persistent buffer ``target`` bound to ``value``, placed
        before the input ``before`` (a target) where the program has one of that kind, added or not;
        otherwise after the last input of its kind."""
        if kind not in _NAME_PREFIX:
            raise ValueError(f"a pass adds parameters and buffers, not {kind}")
        with self.graph.inserting_before(next(iter(self.graph.nodes))):  # ordered in program()
            node = self.graph.placeholder(_export_name(kind, target))
        node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True) if self.fake_mode else value
        self._added.append(_AddedInput(kind, target, node, value, before))
        return node

    def remove_input(self, node: fx.Node) -> None:
        """Drop the input ``node`` (which nothing may read by then) from the program."""
        self._removed.add(node.name)

    def program(self) -> ExportedProgram:
        """The edited program: the new inputs in place, the removed ones gone, the graph checked."""
        graph, signature = self.graph, self.ep.graph_signature
        state_dict, constants = dict(self.ep.state_dict), dict(self.ep.constants)
        specs = []
        for spec in signature.input_specs:
            if getattr(spec.arg, "name", None) in self._removed:
                state_dict.pop(spec.target, None)
                constants.pop(spec.target, None)
                graph.erase_node(self.placeholders[spec.arg.name])
            else:
                specs.append(spec)
        taken = {n.name for n in graph.nodes}
        for added in _placing_order(self._added):
            kind, target, node = added.kind, added.target, added.node
            if node.name != _export_name(kind, target) and _export_name(kind, target) not in taken:
                node.name = _export_name(kind, target)  # it was a removed input's name when node was made
            is_parameter = kind == InputKind.PARAMETER
            state_dict[target] = torch.nn.Parameter(added.value, requires_grad=False) if is_parameter else added.value
            rank = _INPUT_ORDER.index(kind)
            at = next((i for i, spec in enumerate(specs) if spec.kind == kind and spec.target == added.before), None)
            if at is None:
                at = next((i for i in reversed(range(len(specs))) if _INPUT_ORDER.index(specs[i].kind) <= rank), -1) + 1
            specs.insert(at, InputSpec(kind, TensorArgument(node.name), target,
                                       persistent=True if kind == InputKind.BUFFER else None))
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        anchor = next(n for n in graph.nodes if n.op != "placeholder")
        for spec in specs:  # placeholders in the signature's order, before every other node
            anchor.prepend(placeholders[spec.arg.name])
        # No eliminate_dead_code: it would also drop nodes whose effect is not their output, which FX
        # cannot tell from pure ones (transformers 4.57's masks call vmap, whose nesting level calls have
        # no users; without them the program fails at run time). Each pass erases what it leaves unused.
        graph.lint()
        self.graph_module.recompile()
        new_signature = ExportGraphSignature(input_specs=specs, output_specs=list(signature.output_specs))
        return self.ep._update(self.graph_module, new_signature, state_dict=state_dict, constants=constants)


@dataclasses.dataclass(frozen=True)
class _AddedInput:
    kind: InputKind
    target: str
    node: fx.Node
    value: torch.Tensor
    before: str | None


def _placing_order(added: list[_AddedInput]) -> list[_AddedInput]:
    """``added``, each input after the added one it goes before, so that one is in place when it is
    placed (``q.weight`` before ``k.weight`` before ``v.weight``: v first, then k, then q)."""
    by_target = {(a.kind, a.target): a for a in added}
    order: list[_AddedInput] = []
    placed: set[int] = set()
    for a in added:
        chain: list[_AddedInput] = []
        while a is not None and id(a) not in placed:
            placed.add(id(a))
            chain.append(a)
            a = by_target.get((a.kind, a.before))
        order.extend(reversed(chain))
    return order


def _export_name(kind: InputKind, target: str) -> str:
    return f"{_NAME_PREFIX[kind]}_{target.replace('.', '_')}".lower()  # as FX and torch.export name it


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
