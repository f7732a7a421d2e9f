"""A quantized transformers causal LM as one ONNX graph: what ``qpass export-onnx`` and
examples/onnx_runtime.py write, and a greedy generation loop over it in ONNX Runtime.

Two graphs, both with every dimension dynamic (batch, and sequence up to the model's
``max_position_embeddings``) and everything in the model's dtype except the int64 ids:

- without KV cache (``export_causal_lm(lm, f)``): input ``input_ids`` ``[batch, sequence]``; output
  ``logits`` ``[batch, sequence, vocab]``. Each call runs the whole sequence: scoring, ranking,
  classification by next-token logits.
- with KV cache (``export_causal_lm(lm, f, with_past=True)``), in the input and output names of Hugging
  Face Optimum's ONNX causal LMs:

  - inputs ``input_ids`` and ``position_ids``, int64 ``[batch, sequence]``; ``attention_mask``, int64
    ``[batch, past + sequence]`` (1 for a token, 0 for padding, past tokens included); per layer ``i``,
    ``past_key_values.{i}.key`` and ``past_key_values.{i}.value``, ``[batch, kv_heads, past, head_dim]``
    (``past`` may be 0: the first call of a generation passes empty ones);
  - outputs ``logits`` ``[batch, sequence, vocab]`` and per layer ``present.{i}.key`` and
    ``present.{i}.value``, ``[batch, kv_heads, past + sequence, head_dim]``: the next call's past.

  ``generate_greedy`` runs it token by token, with the position ids transformers' ``generate`` gives
  (``position_ids_for``), an empty past first (``empty_past``), then each call's presents (``next_past``).

The quantized layers are translated as ``qpass.integrations.onnx`` says (4-bit as
``com.microsoft.MatMulBnb4``, int8 as standard operators).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
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


class CausalLMWithPast(nn.Module):
    """A causal LM over plain tensors (the module docstring's graph with KV cache): the past keys and values
    come in as one ``(key, value)`` pair per layer and fill a transformers ``DynamicCache``; the logits and
    the grown cache's keys and values go out as a flat tuple ``(logits, key 0, value 0, key 1, ...)``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # Full-length layers for every model: a sliding-window model's DynamicCache(config=...) would keep
        # only its window, while the attention mask still covers every past token; the mask built from the
        # config applies the window instead.
        cache = DynamicCache()
        for layer, (key, value) in enumerate(past_key_values):
            cache.update(key, value, layer)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        return (out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)))


def with_past_names(layers: int) -> tuple[list[str], list[str]]:
    """The input and output names of the graph with KV cache of a model with ``layers`` layers."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def position_ids_for(attention_mask: np.ndarray | torch.Tensor, sequence: int):
    """The position ids transformers' ``generate`` gives the last ``sequence`` tokens of a batch whose
    ``attention_mask`` (``[batch, past + sequence]``, 0 for left padding) covers the past too: each
    token's index among its row's real tokens, 0 for padding."""
    positions = attention_mask.cumsum(-1) - 1
    positions[attention_mask == 0] = 0
    return positions[:, -sequence:]


def _example_ids(config, example_ids: torch.Tensor | None, with_past: bool) -> torch.Tensor:
    max_sequence = getattr(config, "max_position_embeddings", None)
    if example_ids is None:
        length = 8 if max_sequence is None else min(8, max_sequence)
        example_ids = torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    smallest = 4 if with_past else 2  # with past, the example splits in two halves of >= 2
    if example_ids.dim() != 2 or example_ids.shape[0] < 2 or example_ids.shape[1] < smallest:
        # torch.export fixes a dimension it sees with size 1: a batch-1 example gives a batch-1-only graph
        split = " (with_past traces the first half as the past, the second as the input)" if with_past else ""
        raise ValueError(f"example_ids must be [batch, sequence] with batch >= 2 and sequence >= {smallest}, got "
                         f"shape {tuple(example_ids.shape)}: a dimension traced at size 1 would be fixed at 1 in "
                         f"the ONNX graph{split}")
    return example_ids


def export_causal_lm(lm: nn.Module, f: str | os.PathLike | None = None, *, with_past: bool = False,
                     example_ids: torch.Tensor | None = None, **options) -> torch.onnx.ONNXProgram:
    """``qpass.export_onnx`` of the transformers causal LM ``lm`` (quantized by qpass) as one of the graphs
    the module docstring describes (with KV cache if ``with_past``); written to ``f`` atomically if given.

    ``example_ids`` ([batch, sequence], batch >= 2 and sequence >= 2, >= 4 with past; default 2 x 8
    random tokens) is what the model is traced with: the tokens do not matter, the exported graph takes
    any batch and length, 1 included (and a past of 0). With past, the first half of the example is run
    through ``lm`` for a real past and the second half is traced, with the first row left-padded by one
    token so that the graph is traced with padding in its mask. ``options`` go to ``qpass.export_onnx``
    (``optimize=True``, ``verbose=False``, ...)."""
    config = lm.config.get_text_config()
    max_sequence = getattr(config, "max_position_embeddings", None)
    example_ids = _example_ids(config, example_ids, with_past).to(lm.device)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max_sequence)
    if not with_past:
        return export_onnx(CausalLMLogits(lm).eval(), (example_ids,), f, dynamic_shapes=({0: batch, 1: sequence},),
                           input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, **options)

    split = example_ids.shape[1] // 2
    attention_mask = torch.ones_like(example_ids)
    attention_mask[0, 0] = 0
    past_mask = attention_mask[:, :split]
    with torch.no_grad():
        cache = lm(input_ids=example_ids[:, :split], attention_mask=past_mask,
                   position_ids=position_ids_for(past_mask, split), use_cache=True).past_key_values
    past = tuple((layer.keys, layer.values) for layer in cache.layers)
    new_tokens = example_ids[:, split:]
    args = (new_tokens, attention_mask, position_ids_for(attention_mask, new_tokens.shape[1]), past)
    # torch.export refuses a dimension that is a sum of two others, so the mask's length is a dimension of its own
    past_sequence, total = torch.export.Dim("past_sequence"), torch.export.Dim("past_sequence_plus_sequence")
    cache_dims = {0: batch, 2: past_sequence}
    dynamic_shapes = ({0: batch, 1: sequence}, {0: batch, 1: total}, {0: batch, 1: sequence},
                      tuple((cache_dims, cache_dims) for _ in past))
    input_names, output_names = with_past_names(len(past))
    with warnings.catch_warnings():  # torch.onnx names a Dim once, then warns at each further use of it
        warnings.filterwarnings("ignore", "# The axis name: .* will not be used", UserWarning)
        return export_onnx(CausalLMWithPast(lm).eval(), args, f, dynamic_shapes=dynamic_shapes,
                           input_names=input_names, output_names=output_names, **options)


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """The ``past_key_values.*`` feed of a first call of the graph with KV cache in the ONNX Runtime
    ``session``: zeros of shape ``[batch, kv_heads, 0, head_dim]`` in the graph's cache dtype."""
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feed = {}
    for arg in past:
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(arg.type)
        if dtype is None:
            raise ValueError(f"the KV cache is fed from NumPy, which has no {arg.type}; export with float32 or "
                             "float16")
        _, kv_heads, _, head_dim = arg.shape  # batch and past are named dimensions, the others fixed numbers
        feed[arg.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype)
    return feed


def next_past(session, present: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A call's ``present.{i}.key/.value`` outputs (all outputs after ``logits``, in order) as the next
    call's ``past_key_values.{i}.key/.value`` feed."""
    names = (o.name.replace("present", "past_key_values", 1) for o in session.get_outputs()[1:])
    return dict(zip(names, present))


def generate_greedy(session, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
                    max_new_tokens: int, eos_token_id: int | None = None, pad_token_id: int | None = None
                    ) -> np.ndarray:
    """Greedy decoding in ONNX Runtime: ``session`` is an ``onnxruntime.InferenceSession`` of the graph
    ``export_causal_lm(..., with_past=True)`` writes; ``input_ids`` int64 ``[batch, sequence]``, left-padded
    where ``attention_mask`` is 0 (default: no padding). Returns ``[batch, sequence + new]`` int64, the
    prompt then up to ``max_new_tokens`` tokens, as transformers' ``generate(..., do_sample=False)``:
    once a row has given ``eos_token_id`` it goes on with ``pad_token_id`` (default ``eos_token_id``), and
    the loop stops when every row has."""
    if "past_key_values.0.key" not in {i.name for i in session.get_inputs()}:
        raise ValueError("generate_greedy needs the graph with KV cache: export it with "
                         "export_causal_lm(..., with_past=True) or qpass export-onnx --with-past")
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch = input_ids.shape[0]
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    feed = empty_past(session, batch)
    tokens, step, done = input_ids, input_ids, np.zeros(batch, bool)
    for _ in range(max_new_tokens):
        feed.update(input_ids=step, attention_mask=attention_mask,
                    position_ids=position_ids_for(attention_mask, step.shape[1]))
        logits, *present = session.run(None, feed)
        next_token = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            next_token = np.where(done, eos_token_id if pad_token_id is None else pad_token_id, next_token)
            done |= next_token == eos_token_id
        tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
        if done.all():
            break
        step = next_token[:, None]
        attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), np.int64)], axis=1)
        feed.update(next_past(session, present))
    return tokens
