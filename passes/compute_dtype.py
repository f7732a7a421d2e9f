"""Graph pass: change the compute dtype of the qpass linear ops of an ``ExportedProgram``, the
``QuantizedLinear.set_compute_dtype_`` of the graph front-end. Only the ops' dtype argument changes:
the quantized tensors are the same bytes, and each op still returns its input's dtype."""

from __future__ import annotations

import dataclasses

import torch
from torch.export import ExportedProgram

from .program_edit import ProgramEdit, quantized_linear_nodes


def set_compute_dtype_exported_program(ep: ExportedProgram, dtype: torch.dtype) -> ExportedProgram:
    """A new ``ExportedProgram`` whose quantized linears compute in ``dtype``; ``ep`` is unchanged."""
    edit = ProgramEdit(ep)
    for q in quantized_linear_nodes(ep, edit.graph):
        try:
            config = dataclasses.replace(q.call.layout.config, compute_dtype=dtype)  # the config validates it
        except ValueError as err:
            raise ValueError(f"layer {q.layer!r}: {err}") from err
        layout = dataclasses.replace(q.call.layout, config=config)
        q.node.args = layout.linear_call(q.call.x, q.call.tensors, q.call.bias)[1]
        q.node.kwargs = {}
    return edit.program()
