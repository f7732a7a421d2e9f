"""Causal LMs exported to ONNX with KV cache (``export_causal_lm(..., with_past=True)``) and generated from
in ONNX Runtime (``generate_greedy``), against transformers' own ``generate`` of the same qpass model."""

import numpy as np
import onnxruntime
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import qpass
from qpass.integrations.onnx_causal_lm import (empty_past, export_causal_lm, generate_greedy, next_past,
                                              position_ids_for)

from models import ONNX_INT8_MODEL, relative_error, tiny_gpt2, tiny_llama

F32 = torch.float32


def tiny_mistral_with_sliding_window() -> MistralForCausalLM:
    """Attention over the last 4 tokens only: generation soon runs past the window."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                           max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


LLAMA_NF4_INT8 = qpass.QPassConfig(qpass.NF4Config(compute_dtype=F32),
                                   overrides={"*.mlp.down_proj": qpass.Int8Config(compute_dtype=F32)})
MODELS = {  # name: (model, plan, tolerance on logits)
    "llama-nf4-int8": (tiny_llama, LLAMA_NF4_INT8, ONNX_INT8_MODEL),
    "gpt2-fp4": (tiny_gpt2, qpass.FP4Config(compute_dtype=F32), 1e-6),  # Conv1D layers, learned positions
    "mistral-sliding-window-nf4": (tiny_mistral_with_sliding_window, qpass.NF4Config(compute_dtype=F32), 1e-6),
}


@pytest.fixture(scope="module", params=MODELS, ids=str)
def exported(request, tmp_path_factory):
    """(qpass model, ONNX Runtime session of its graph with KV cache, logits tolerance)."""
    make, plan, tolerance = MODELS[request.param]
    model = qpass.quantize(make(), plan)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    export_causal_lm(model, path, with_past=True)
    return model, onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]), tolerance


def _left_padded_prompts(vocab, seed=1):
    prompts = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return prompts, mask


def test_greedy_generation_equals_transformers_generate(exported):
    """Left-padded prompts of three lengths, 10 new tokens (past the Mistral's 4-token window)."""
    model, session, _ = exported
    prompts, mask = _left_padded_prompts(model.config.vocab_size)
    got = generate_greedy(session, prompts.numpy(), mask.numpy(), max_new_tokens=10)
    with torch.no_grad():
        want = model.generate(prompts, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert got.tolist() == want.tolist()


def test_logits_with_and_without_past_equal_one_forward(exported):
    """A prompt with an empty past, then three tokens at once on its past: the logits of both calls are
    those of one transformers forward over the whole sequence."""
    model, session, tolerance = exported
    ids, mask = _left_padded_prompts(model.config.vocab_size, seed=2)
    ids = torch.cat([ids, torch.randint(0, model.config.vocab_size, (3, 3))], dim=1)
    mask = torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask, ids.shape[1])).logits
    real = mask.bool()  # the logits of padding positions are not compared
    feed = {"input_ids": ids[:, :7].numpy(), "attention_mask": mask[:, :7].numpy(),
            "position_ids": position_ids_for(mask[:, :7], 7).numpy(), **empty_past(session, 3)}
    first, *present = session.run(None, feed)
    assert relative_error(torch.from_numpy(first)[real[:, :7]], want[:, :7][real[:, :7]]) < tolerance
    feed = {"input_ids": ids[:, 7:].numpy(), "attention_mask": mask.numpy(),
            "position_ids": position_ids_for(mask, 3).numpy(), **next_past(session, present)}
    second, *grown = session.run(None, feed)
    assert relative_error(torch.from_numpy(second), want[:, 7:]) < tolerance
    assert all(g.shape[2] == 10 for g in grown)


def test_rows_stop_at_eos_and_go_on_with_padding(exported):
    model, session, _ = exported
    prompts, mask = _left_padded_prompts(model.config.vocab_size)
    first_tokens = generate_greedy(session, prompts.numpy(), mask.numpy(), max_new_tokens=1)[:, -1]
    eos = int(first_tokens[0])  # row 0 stops at once; the others run on unless they give it too
    got = generate_greedy(session, prompts.numpy(), mask.numpy(), max_new_tokens=6, eos_token_id=eos,
                          pad_token_id=3)
    with torch.no_grad():
        want = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                              pad_token_id=3)
    assert got.tolist() == want.tolist()
    assert got[0, 8:].tolist() == [3] * (got.shape[1] - 8)


def test_graph_inputs_and_outputs_have_optimum_names_and_dynamic_dimensions(exported):
    model, session, _ = exported
    layers = model.config.num_hidden_layers
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert inputs["input_ids"] == inputs["position_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"] == ["batch", "past_sequence_plus_sequence"]
    assert inputs["past_key_values.0.key"][0] == "batch" and inputs["past_key_values.0.key"][2] == "past_sequence"
    outputs = [o.name for o in session.get_outputs()]
    assert outputs == ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def test_unmerged_qlora_adapters_export_and_generate_as_peft_does(tmp_path):
    """A QLoRA model as trained (adapters beside the NF4 base, not merged) exported with its KV cache: the
    base layers stay MatMulBnb4, the adapters become plain MatMuls, and ONNX Runtime generates PEFT's tokens."""
    import onnx
    from peft import LoraConfig

    from qpass.integrations import peft as qpass_peft

    base = qpass.quantize(tiny_llama(), qpass.NF4Config(compute_dtype=F32))
    torch.manual_seed(0)
    model = qpass_peft.get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    export_causal_lm(model, tmp_path / "model.onnx", with_past=True)
    ops = [node.op_type for node in onnx.load(tmp_path / "model.onnx").graph.node]
    assert ops.count("MatMulBnb4") == 7 * model.config.num_hidden_layers
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    prompts, mask = _left_padded_prompts(model.config.vocab_size)
    with torch.no_grad():
        want = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=0)
        with model.disable_adapter():
            without_adapters = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=8,
                                              do_sample=False, pad_token_id=0)
    assert want.tolist() != without_adapters.tolist()  # the adapters change what is generated
    assert generate_greedy(session, prompts.numpy(), mask.numpy(), max_new_tokens=8).tolist() == want.tolist()


def test_generate_greedy_refuses_the_graph_without_past(tmp_path):
    model = qpass.quantize(tiny_llama(), qpass.NF4Config(compute_dtype=F32))
    export_causal_lm(model, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match=r"needs the graph with KV cache: .* with_past=True"):
        generate_greedy(session, np.zeros((1, 4), np.int64), max_new_tokens=2)


@pytest.mark.parametrize("shape", [(2, 3), (1, 8)])
def test_export_with_past_refuses_an_example_too_short_to_split(shape):
    model = qpass.quantize(tiny_llama(), qpass.NF4Config(compute_dtype=F32))
    with pytest.raises(ValueError, match=r"batch >= 2 and sequence >= 4, .*with_past traces the first half"):
        export_causal_lm(model, with_past=True, example_ids=torch.zeros(shape, dtype=torch.long))
