"""A quantized transformers causal LM as one ONNX graph, ``input_ids -> logits``: what ``qpass export-onnx``
and examples/onnx_runtime.py write.

The graph: input ``input_ids``, int64 ``[batch, sequence]``; output ``logits``, ``[batch, sequence, vocab]``
in the model's dtype. Both dimensions are dynamic, the sequence up to the model's
``max_position_embeddings``. There is no KV cache: each call runs the whole sequence (scoring, ranking,
classification by next-token logits), not token-by-token generation. The layers are translated as
``qpass.integrations.onnx`` says (4-bit as ``com.microsoft.MatMulBnb4``, int8 as standard operators).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .onnx import export_onnx

INPUT_NAMES = ["input_ids"]
OUTPUT_NAMES = ["logits"]


class CausalLMLogits(nn.Module):
    """A causal LM as ``input_ids -> logits``: one tensor out, no KV-cache object, as ONNX wants."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def export_causal_lm(lm: nn.Module, f: str | os.PathLike | None = None, *, example_ids: torch.Tensor | None = None,
                     **options) -> torch.onnx.ONNXProgram:
    """``qpass.export_onnx`` of the transformers causal LM ``lm`` (quantized by qpass) as the graph the module
    docstring describes; written to ``f`` atomically if given. ``example_ids`` ([batch, sequence], batch
    and sequence >= 2; default 2 x 8 random tokens) is what the model is traced with: the tokens do not
    matter, the exported graph takes any batch and sequence length, 1 included. ``options`` go to
    ``qpass.export_onnx`` (``optimize=True``, ``verbose=False``, ...)."""
    config = lm.config.get_text_config()
    max_sequence = getattr(config, "max_position_embeddings", None)
    if example_ids is None:
        length = 8 if max_sequence is None else min(8, max_sequence)
        example_ids = torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    if example_ids.dim() != 2 or min(example_ids.shape) < 2:
        # torch.export fixes a dimension it sees with size 1: a batch-1 example gives a batch-1-only graph
        raise ValueError(f"example_ids must be [batch, sequence] with both >= 2, got shape {tuple(example_ids.shape)}: "
                         "a dimension traced at size 1 would be fixed at 1 in the ONNX graph")
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=max_sequence)}
    return export_onnx(CausalLMLogits(lm).eval(), (example_ids.to(lm.device),), f, dynamic_shapes=(dims,),
                       input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, **options)
