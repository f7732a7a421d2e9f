"""Find the linear layers of a ``torch.export`` graph: ops that multiply an input by a 2-D parameter.

Recognised, with ``W`` a parameter placeholder and ``Wt`` one of ``aten.t(W)``, ``aten.permute(W, [1, 0])``,
``aten.transpose(W, 0, 1)``, ``aten.numpy_T(W)`` and ``aten.mT(W)`` (``W.T`` and ``W.mT``: Falcon's
``x @ self.weight.T``):

* ``aten.linear(x, W[, b])``                               -> weight ``W``   (nn.Linear, pre-dispatch IR)
* ``aten.mm(x, Wt)``, ``aten.matmul(x, Wt)``, ``aten.addmm(b, x, Wt)``   -> weight ``W``   (decomposed IR)
* ``aten.mm(x, W)``, ``aten.matmul(x, W)``, ``aten.addmm(b, x, W)``      -> weight ``W^T`` (Conv1D layout)

A weight is matched only when every use of it is one of these, so a weight tied to an embedding or
read by any other op is left alone.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

aten = torch.ops.aten
_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int, aten.numpy_T.default, aten.mT.default)
_MATMULS = (aten.mm.default, aten.matmul.default, aten.addmm.default)


@dataclasses.dataclass(frozen=True)
class LinearMatch:
    node: fx.Node  # the node computing x @ W^T (+ b); replaced by the quantized op
    weight: fx.Node  # the parameter placeholder
    weight_is_transposed: bool  # True when the graph holds W^T, i.e. the parameter is [in, out]
    transpose: fx.Node | None  # the aten.t / permute / transpose node between W and the matmul, if any

    # x and bias are read from the node when asked, not stored: rewriting one linear rewires the
    # inputs of the next (a chain of linears), so stored references would go stale.
    @property
    def x(self) -> fx.Node:
        return self.node.args[1] if self.node.target == aten.addmm.default else self.node.args[0]

    @property
    def bias(self) -> fx.Node | None:
        if self.node.target == aten.addmm.default:
            return self.node.args[0]
        if self.node.target == aten.linear.default:
            return self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("bias")
        return None


def _is_swap_of_2d(node: fx.Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default, aten.mT.default):  # of a 2-D weight: a swap
        return True
    if node.target == aten.permute.default:
        return list(node.args[1]) == [1, 0]
    dims = sorted(d % 2 for d in node.args[1:3])
    return dims == [0, 1]


def _unit_addmm(node: fx.Node) -> bool:
    return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1


def _match_use(use: fx.Node, weight: fx.Node) -> list[LinearMatch] | None:
    """The linear matches that ``use`` (a direct user of ``weight``) belongs to, or None if it is not one."""
    if use.op != "call_function":
        return None
    if use.target == aten.linear.default and use.args[1] is weight and use.args[0] is not weight:
        return [LinearMatch(use, weight, False, None)]
    if use.target in _TRANSPOSES and use.args[0] is weight and _is_swap_of_2d(use):
        matches = [_match_matmul(user, use, weight, transposed_param=False) for user in use.users]
        return None if any(m is None for m in matches) else matches
    match = _match_matmul(use, weight, weight, transposed_param=True)
    return None if match is None else [match]


def _match_matmul(node: fx.Node, rhs: fx.Node, weight: fx.Node, transposed_param: bool) -> LinearMatch | None:
    if node.op != "call_function" or node.target not in _MATMULS:
        return None
    transpose = None if rhs is weight else rhs
    if node.target == aten.addmm.default:
        bias, x, other = node.args[:3]
        if other is not rhs or x is rhs or not _unit_addmm(node) or not _is_vector(bias):
            return None
        return LinearMatch(node, weight, transposed_param, transpose)
    x, other = node.args[:2]
    if other is not rhs or x is rhs:
        return None
    return LinearMatch(node, weight, transposed_param, transpose)


def _is_vector(node) -> bool:
    val = getattr(node, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 1


def find_linear_weights(graph: fx.Graph, parameter_names: dict[str, str]) -> dict[fx.Node, list[LinearMatch]]:
    """``{parameter placeholder: its linear uses}`` for each 2-D parameter used only as a linear weight.

    ``parameter_names`` maps placeholder names to parameter FQNs (``graph_signature.inputs_to_parameters``).
    """
    found: dict[fx.Node, list[LinearMatch]] = {}
    for node in graph.nodes:
        if node.op != "placeholder" or node.name not in parameter_names:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 2 or not node.users:
            continue
        matches: list[LinearMatch] = []
        for use in node.users:
            use_matches = _match_use(use, node)
            if use_matches is None:
                break
            matches += use_matches
        else:
            found[node] = matches
    return found
