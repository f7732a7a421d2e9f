"""The torch.export front-end: the graph pass, its equivalence with the module front-end, save/load."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import qpass
from qpass.integrations.onnx_causal_lm import CausalLMLogits  # input_ids -> logits, what export traces
from qpass.passes import find_linear_weights

from models import (COMPILE_VS_EAGER_BF16, relative_error, same_bytes, tiny_bert_classifier, tiny_gpt2, tiny_llama,
                    tiny_t5)

QOPS = {torch.ops.qpass.linear_4bit.default, torch.ops.qpass.linear_int8.default}


def _ops(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


class Block(nn.Module):  # noqa: D101
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 16, bias=False)
        self.scale = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) * self.scale


def make_block():
    torch.manual_seed(0)
    return Block().eval()


def test_pass_rewrites_linears_and_state():
    model = make_block()
    x = torch.randn(3, 32)
    ep = torch.export.export(model, (x,))
    ep_q = qpass.quantize(ep, "nf4", skip_modules=[])
    ops = _ops(ep_q)
    assert ops.count(torch.ops.qpass.linear_4bit.default) == 2
    assert torch.ops.aten.linear.default not in ops
    assert "up.weight" in ep_q.state_dict and ep_q.state_dict["up.weight"].dtype == torch.uint8
    assert "up.bias" in ep_q.state_dict and "scale" in ep_q.state_dict  # untouched parameters stay
    assert {"down.absmax", "down.nested_absmax", "down.offset"} <= set(ep_q.state_dict)
    # the input program is left as it was
    assert torch.ops.aten.linear.default in _ops(ep) and ep.state_dict["up.weight"].dtype == torch.float32


@pytest.mark.parametrize("spec", ["nf4", "fp4", "int8",
                                  qpass.NF4Config(double_quant=False, compute_dtype=torch.float32)])
def test_exported_and_module_front_ends_agree_exactly(spec):
    x = torch.randn(4, 32)
    ep_q = qpass.quantize(torch.export.export(make_block(), (x,)), spec, skip_modules=[])
    module_q = qpass.quantize(make_block(), spec, skip_modules=[])
    assert torch.equal(ep_q.module()(x), module_q(x))
    for key, value in module_q.state_dict().items():
        assert same_bytes(ep_q.state_dict[key], value), key


def test_llama_export_quantize_save_load(tmp_path):
    model = CausalLMLogits(tiny_llama())
    ids = torch.randint(0, 128, (1, 10))
    ep = torch.export.export(model, (ids,))
    plan = qpass.QPassConfig("nf4", overrides={"*.self_attn.*": "int8"})
    ep_q = qpass.quantize(ep, plan)
    ops = _ops(ep_q)
    assert ops.count(torch.ops.qpass.linear_int8.default) == 8
    assert ops.count(torch.ops.qpass.linear_4bit.default) == 6
    assert ops.count(torch.ops.aten.linear.default) == 1  # lm_head, skipped by default

    module_q = qpass.quantize(CausalLMLogits(tiny_llama()), plan)
    with torch.no_grad():
        expected = module_q(ids)
    torch.testing.assert_close(ep_q.module()(ids), expected, rtol=0, atol=0)

    try:
        torch.export.save(ep, tmp_path / "llama.pt2")
    except torch._export.serde.serialize.SerializeError as error:  # transformers 4.57's vmap masks
        pytest.skip(f"torch.export cannot save the float program either: {str(error)[:80]}")
    path = tmp_path / "llama_nf4.pt2"
    torch.export.save(ep_q, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(ids), expected, rtol=0, atol=0)
    assert _ops(loaded).count(torch.ops.qpass.linear_4bit.default) == 6


def test_decomposed_graphs_are_matched_too():
    """After run_decompositions, linears are (add)mm over a transposed parameter."""
    x = torch.randn(2, 5, 32)
    ep = torch.export.export(make_block(), (x,)).run_decompositions()
    assert torch.ops.aten.linear.default not in _ops(ep)
    ep_q = qpass.quantize(ep, "int8", skip_modules=[])
    assert _ops(ep_q).count(torch.ops.qpass.linear_int8.default) == 2
    assert not any(t in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) for t in _ops(ep_q))
    module_q = qpass.quantize(make_block(), "int8", skip_modules=[])
    torch.testing.assert_close(ep_q.module()(x), module_q(x), rtol=1e-5, atol=1e-5)


class WeightTimesInput(nn.Module):
    """A layer that multiplies by its weight itself, spelled as ``transpose``: ``x @ W.T`` (Falcon's
    ``FalconLinear``), ``x @ W.mT`` or ``x @ W.t()``."""

    def __init__(self, transpose):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 32) * 0.1)
        self.transpose = transpose

    def forward(self, x):
        return x @ self.transpose(self.weight)


@pytest.mark.parametrize("spelling", ["W.T", "W.mT", "W.t()"])
def test_every_spelling_of_a_transposed_weight_is_matched(spelling):
    transpose = {"W.T": lambda w: w.T, "W.mT": lambda w: w.mT, "W.t()": lambda w: w.t()}[spelling]
    layer = WeightTimesInput(transpose).eval()
    x = torch.randn(2, 5, 32)
    ep_q = qpass.quantize(torch.export.export(layer, (x,)), "nf4", skip_modules=[])
    assert _ops(ep_q).count(torch.ops.qpass.linear_4bit.default) == 1
    assert torch.ops.aten.matmul.default not in _ops(ep_q)
    linear = qpass.quantize(nn.Sequential(nn.Linear(32, 16, bias=False)), "nf4", skip_modules=[])
    linear[0].requantize_(layer.weight.detach())  # the same weight through the module front-end
    torch.testing.assert_close(ep_q.module()(x), linear(x), rtol=0, atol=0)


def test_conv1d_export_matches_module_front_end():
    ids = torch.randint(0, 128, (1, 8))
    ep_q = qpass.quantize(torch.export.export(CausalLMLogits(tiny_gpt2()), (ids,)), "fp4")
    assert _ops(ep_q).count(torch.ops.qpass.linear_4bit.default) == 8
    module_q = qpass.quantize(CausalLMLogits(tiny_gpt2()), "fp4")
    with torch.no_grad():
        expected = module_q(ids)
    torch.testing.assert_close(ep_q.module()(ids), expected, rtol=0, atol=0)


def test_tied_and_non_linear_uses_are_left_alone():
    model = CausalLMLogits(tiny_llama(tie_word_embeddings=True))
    ep = torch.export.export(model, (torch.randint(0, 128, (1, 6)),))
    ep_q = qpass.quantize(ep, "nf4", skip_modules=[])
    # lm_head shares its weight with the embedding lookup: not a pure linear weight
    assert _ops(ep_q).count(torch.ops.aten.linear.default) == 1
    assert _ops(ep_q).count(torch.ops.aten.embedding.default) == 1


def _llama_classifier():
    from transformers import LlamaForSequenceClassification

    config = tiny_llama().config
    config.num_labels = 3
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


DEFAULT_SKIP_CASES = {  # transformers model -> (left out by default, left out even with skip_modules=[])
    "llama causal LM": (tiny_llama, {"lm_head"}, set()),
    "llama classifier": (_llama_classifier, {"score"}, set()),
    "bert classifier": (tiny_bert_classifier, {"classifier"}, set()),
    "t5": (tiny_t5, set(), {"wo", "lm_head"}),  # _keep_in_fp32_modules (every block's wo); lm_head is tied
    "gpt2": (tiny_gpt2, set(), {"lm_head"}),  # tied
}


@pytest.mark.parametrize("case", DEFAULT_SKIP_CASES)
def test_an_exported_transformers_model_gets_the_module_front_ends_default_skips(case):
    """The default skip list of a transformers model, exported, is the module's: its output layer, the layer
    holding its last parameter (a classifier head), its _keep_in_fp32_modules; read off the program."""
    from qpass.passes import quantize_exported_program

    build, skipped, never = DEFAULT_SKIP_CASES[case]
    model = build().eval()
    ids = torch.randint(3, 100, (1, 6))
    inputs = {"input_ids": ids, "decoder_input_ids": ids} if case == "t5" else {"input_ids": ids}
    options = {} if case == "bert classifier" else {"use_cache": False}
    ep = torch.export.export(model, (), {**inputs, **options})
    quantized = set(quantize_exported_program(ep, qpass.QPassConfig("nf4"))[1].quantized)
    in_memory = qpass.quantize(model, "nf4")
    assert quantized == {name for name, m in in_memory.named_modules() if isinstance(m, qpass.QuantizedLinear)}
    left_out = {name.rsplit(".", 1)[-1] for name, m in in_memory.named_modules() if isinstance(m, nn.Linear)}
    assert quantized and left_out == skipped | never
    everything = set(quantize_exported_program(ep, qpass.QPassConfig("nf4", skip_modules=[]))[1].quantized)
    assert {name.rsplit(".", 1)[-1] for name in everything - quantized} == skipped


def test_a_loaded_exported_model_resolves_its_transformers_class(tmp_path):
    """A program loaded from a file names its model class: resolved by importing it from transformers
    (here in a process that had not imported the model's module), so the default skips the classifier."""
    path = tmp_path / "bert_classifier.pt2"
    torch.export.save(torch.export.export(tiny_bert_classifier().eval(), (torch.randint(3, 100, (1, 6)),)), path)
    code = ("import sys, torch, qpass, transformers.modeling_outputs\n"
            "from qpass.passes import quantize_exported_program\n"
            f"ep = torch.export.load({str(path)!r})\n"
            "assert 'transformers.models.bert.modeling_bert' not in sys.modules\n"
            "print(sorted(quantize_exported_program(ep, qpass.QPassConfig('nf4'))[1].quantized))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    quantized = eval(out.stdout.strip().splitlines()[-1])  # a printed list of str
    assert len(quantized) == 7 and "classifier" not in quantized and "bert.pooler.dense" in quantized


@pytest.mark.parametrize("root", ["transformers.models.nope.modeling_nope.NopeForCausalLM", "not_imported_pkg.Model"])
def test_an_exported_model_of_an_unknown_class_gets_the_plain_default(root):
    """A recorded class that cannot be found (another transformers version) or lives in a module this
    process has not imported (which reading a program never imports) gets the lm_head default."""
    ep = torch.export.export(make_block(), (torch.randn(2, 32),))
    for node in ep.graph.nodes:
        if "nn_module_stack" in node.meta:
            node.meta["nn_module_stack"] = {key: (path, root if path == "" else kind)
                                            for key, (path, kind) in node.meta["nn_module_stack"].items()}
    recorded = {kind for node in ep.graph.nodes for path, kind in node.meta.get("nn_module_stack", {}).values()
                if path == ""}
    assert recorded == {root}
    assert qpass.QPassConfig("nf4").for_model(ep).skip_modules == ("lm_head",)
    assert "not_imported_pkg" not in sys.modules


def test_an_exported_wrapper_of_a_transformers_model_skips_lm_head_only():
    """A module that is not itself a transformers model gets the plain default, exported or not."""
    model = CausalLMLogits(tiny_llama())  # its last parameter is lm_head's: skipped by name either way
    ids = torch.randint(3, 100, (1, 6))
    ep = qpass.quantize(torch.export.export(model, (ids,)), "nf4", skip_modules=None)
    assert _ops(ep).count(torch.ops.aten.linear.default) == 1
    assert qpass.QPassConfig("nf4").for_model(torch.export.export(model, (ids,))).skip_modules == ("lm_head",)


def test_quantizing_an_exported_program_twice_changes_nothing():
    x = torch.randn(2, 32)
    ep_q = qpass.quantize(torch.export.export(make_block(), (x,)), "nf4", skip_modules=[])
    again = qpass.quantize(ep_q, "int8", skip_modules=[])
    assert _ops(again) == _ops(ep_q)
    assert not find_linear_weights(again.graph, dict(again.graph_signature.inputs_to_parameters))


def test_compiled_exported_program_runs():
    x = torch.randn(3, 32)
    ep_q = qpass.quantize(torch.export.export(make_block(), (x,)), "nf4", skip_modules=[])
    compiled = torch.compile(ep_q.module(), fullgraph=True)
    assert relative_error(compiled(x), ep_q.module()(x)) < COMPILE_VS_EAGER_BF16


def test_sequential_chain_of_linears():
    """nn.Sequential's input placeholder is called ``input`` (a name graph copies rename), and its
    linears feed each other directly."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    x = torch.randn(2, 64)
    ep_q = qpass.quantize(torch.export.export(model, (x,)), "nf4")
    assert _ops(ep_q).count(torch.ops.qpass.linear_4bit.default) == 3
    ep_q.graph.lint()
    # a chain of linears: each rewritten op feeds the next (no stale references to erased nodes)
    first, second = [n for n in ep_q.graph.nodes if n.target == torch.ops.qpass.linear_4bit.default][:2]
    assert second.args[0] is first
    torch.testing.assert_close(ep_q.module()(x), qpass.quantize(model, "nf4")(x), rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="AOTInductor compiles the Triton kernels for a CUDA device"))])
@pytest.mark.parametrize("rows", [3, 9])
def test_aot_inductor_package_runs_the_quantized_program(tmp_path, device, rows):
    """AOTInductor compiles the quantized program ahead of time into a .pt2 package (C++, with the qpass
    kernels inside on CUDA) that runs without the model's Python code. On the CPU, 3 rows fuse the 4-bit
    decoding into Inductor's code, 9 call qpass::linear_4bit_cpu through the proxy executor."""
    x = torch.randn(rows, 32, device=device)
    plan = qpass.QPassConfig(qpass.NF4Config(compute_dtype=torch.float32),
                             overrides={"down": qpass.Int8Config(compute_dtype=torch.float32)}, skip_modules=[])
    ep_q = qpass.quantize(torch.export.export(make_block().to(device), (x,)), plan)
    assert set(_ops(ep_q)) >= QOPS
    package = torch._inductor.aoti_compile_and_package(ep_q, package_path=str(tmp_path / "block.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    assert relative_error(runner(x), ep_q.module()(x)) < 1e-5  # 0.0 measured on CPU


def test_ops_aot_inductor_calls_on_the_cpu_take_no_dtype_argument():
    """AOTInductor calls a CPU custom op that Inductor does not trace (qpass::linear_int8_cpu and
    linear_4bit_cpu) through its proxy executor, which in torch 2.11 hands a dtype argument to the kernel
    as another dtype (float32 as float64: the package's int8 layers computed garbage); so those ops take
    none (the test above fails on 2.11 otherwise)."""
    schema = torch.ops.qpass.linear_int8_cpu.default._schema
    assert [a.name for a in schema.arguments] == ["x", "cb", "scb", "bias", "threshold"]
    assert "ScalarType" not in str(schema) and "ScalarType" in str(torch.ops.qpass.linear_int8.default._schema)
    assert "ScalarType" not in str(torch.ops.qpass.linear_4bit_cpu.default._schema)


def test_nodes_kept_for_their_effect_survive_the_pass():
    """torch.vmap exports as calls that enter and leave a vmap level; those have no users, and a dead-code
    pass would drop them (transformers 4.57 builds its attention masks so). The quantized program must
    still run, and equal the module front-end."""

    class VmapThenLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.proj(x) + torch.vmap(lambda row: row.sum() * row[:32])(x)

    x = torch.randn(3, 64)
    ep_q = qpass.quantize(torch.export.export(VmapThenLinear(), (x,)), "nf4", skip_modules=[])
    assert torch.ops.qpass.linear_4bit.default in _ops(ep_q)
    assert torch.equal(ep_q.module()(x), qpass.quantize(VmapThenLinear(), "nf4", skip_modules=[])(x))


# The way back, and the compute dtype, on exported programs (passes/dequantize_linears.py, compute_dtype.py).

def _quantized_nodes(ep):
    return qpass.passes.quantized_linear_nodes(ep, ep.graph)


@pytest.mark.parametrize("spec", ["nf4", "fp4", "int8", qpass.NF4Config(quant_storage=torch.bfloat16)])
def test_dequantizing_an_exported_program_matches_the_module_front_end(spec):
    ids = torch.randint(0, 128, (2, 7))
    ep_q = qpass.quantize(torch.export.export(CausalLMLogits(tiny_llama()), (ids,)), spec)
    ep_d = qpass.dequantize(ep_q)
    assert not _quantized_nodes(ep_d) and _ops(ep_d).count(torch.ops.aten.linear.default) == 15
    assert len(_quantized_nodes(ep_q)) == 14  # the input program is left as it was

    module_d = qpass.dequantize(qpass.quantize(CausalLMLogits(tiny_llama()), spec))
    state = module_d.state_dict()
    assert set(ep_d.state_dict) == set(state)  # the quantized tensors are gone; the weights take their names
    for key, value in state.items():
        assert same_bytes(ep_d.state_dict[key], value), key
    weight = ep_d.state_dict["lm.model.layers.0.mlp.up_proj.weight"]
    assert isinstance(weight, nn.Parameter) and not weight.requires_grad and weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(ep_d.module()(ids), module_d(ids))



def test_a_bare_parameter_gets_its_name_back_after_dequantizing(tmp_path):
    """nn.MultiheadAttention multiplies by in_proj_weight, a bare parameter: the pass quantizes it as the
    layer 'self_attn.in_proj_weight', and dequantizing gives the decoded weight its own name back, also
    after torch.export save/load and run_decompositions, so the state dict loads into the module again."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    ep = torch.export.export(layer, (x,))
    ep_q = qpass.quantize(ep, "nf4", skip_modules=[])
    assert {"self_attn.in_proj_weight.absmax", "self_attn.out_proj.absmax"} <= set(ep_q.state_dict)
    torch.export.save(ep_q, tmp_path / "q.pt2")
    loaded = torch.export.load(tmp_path / "q.pt2")
    for program in (ep_q, loaded, loaded.run_decompositions()):
        ep_d = qpass.dequantize(program)
        assert set(ep_d.state_dict) == set(ep.state_dict)
        assert ep_d.graph_signature.parameters == ep.graph_signature.parameters  # in their places
        assert not any(qpass.passes.PARAMETER_KEY in n.meta.get("custom", {}) for n in ep_d.graph.nodes)
        decoded = copy.deepcopy(layer)
        decoded.load_state_dict(ep_d.state_dict)
        assert not torch.equal(decoded.self_attn.in_proj_weight, layer.self_attn.in_proj_weight)
        with torch.no_grad():
            torch.testing.assert_close(ep_d.module()(x), decoded(x), rtol=1e-5, atol=1e-5)
    assert not any(qpass.passes.PARAMETER_KEY in n.meta.get("custom", {}) for n in ep.graph.nodes)


def test_a_saved_quantized_program_dequantizes_after_loading_and_quantizes_again(tmp_path):
    ids = torch.randint(0, 128, (1, 6))
    ep_q = qpass.quantize(torch.export.export(CausalLMLogits(tiny_gpt2()), (ids,)), "int8")
    torch.export.save(ep_q, tmp_path / "q.pt2")
    ep_d = qpass.dequantize(torch.export.load(tmp_path / "q.pt2"))
    # GPT-2's Conv1D layers come back as aten.linear, their weights [out, in]
    assert ep_d.state_dict["lm.transformer.h.0.attn.c_attn.weight"].shape == (192, 64)
    with torch.no_grad():
        expected = qpass.dequantize(qpass.quantize(CausalLMLogits(tiny_gpt2()), "int8"))(ids)
    torch.testing.assert_close(ep_d.module()(ids), expected, rtol=1e-6, atol=1e-6)
    torch.export.save(ep_d, tmp_path / "d.pt2")
    assert torch.equal(torch.export.load(tmp_path / "d.pt2").module()(ids), ep_d.module()(ids))
    again = qpass.quantize(ep_d, "int8")  # the two passes compose
    assert len(_quantized_nodes(again)) == len(_quantized_nodes(ep_q)) == 8
    torch.testing.assert_close(again.module()(ids), ep_q.module()(ids), rtol=0, atol=0)


def test_dequantizing_a_program_casts_where_its_dtypes_differ():
    ids = torch.randint(0, 128, (2, 5))
    plan = qpass.QPassConfig(qpass.NF4Config(compute_dtype=torch.float32))
    ep_q = qpass.quantize(torch.export.export(CausalLMLogits(tiny_llama(dtype=torch.bfloat16)), (ids,)), plan)
    default = qpass.dequantize(ep_q)  # the dtype of the other parameters: bf16, no casts
    assert default.state_dict["lm.model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.ops.aten._to_copy.default not in _ops(default)
    in_float32 = qpass.dequantize(ep_q, torch.float32)  # the compute dtype: inputs cast, results cast back
    assert in_float32.state_dict["lm.model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert _ops(in_float32).count(torch.ops.aten._to_copy.default) == 2 * 14
    logits = in_float32.module()(ids)
    assert logits.dtype == torch.bfloat16
    assert relative_error(logits, ep_q.module()(ids)) < 1e-2  # bf16 roundings of the same float32 sums


def test_set_compute_dtype_of_an_exported_program():
    ids = torch.randint(0, 128, (2, 5))
    plan = qpass.QPassConfig("nf4", overrides={"*.self_attn.*": "int8"})
    ep_q = qpass.quantize(torch.export.export(CausalLMLogits(tiny_llama()), (ids,)), plan)
    ep_f = qpass.set_compute_dtype(ep_q, torch.float32)
    assert {q.call.layout.config.compute_dtype for q in _quantized_nodes(ep_f)} == {torch.float32}
    assert {q.call.layout.config.compute_dtype for q in _quantized_nodes(ep_q)} == {torch.bfloat16}
    assert ep_f.state_dict.keys() == ep_q.state_dict.keys()
    module = qpass.set_compute_dtype(qpass.quantize(CausalLMLogits(tiny_llama()), plan), torch.float32)
    with torch.no_grad():
        assert torch.equal(ep_f.module()(ids), module(ids))
    with pytest.raises(ValueError, match=r"layer 'lm.model.layers.0.self_attn.q_proj': Int8Config: compute_dtype"):
        qpass.set_compute_dtype(ep_q, torch.int8)


def test_a_quantized_tensor_computed_in_the_graph_is_not_dequantized():
    class ScaledAbsmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = qpass.quantize(nn.Linear(64, 8), qpass.NF4Config(double_quant=False))

        def forward(self, x):
            tensors = dict(self.layer.quantized_tensors, absmax=self.layer.absmax * 2)
            op, args = self.layer.layout.linear_call(x, tensors, self.layer.bias)
            return op(*args)

    ep = torch.export.export(ScaledAbsmax(), (torch.randn(2, 64),))
    with pytest.raises(ValueError, match="layer 'layer': its quantized tensor 'absmax' is computed in the graph"):
        qpass.dequantize(ep)


def test_a_packed_weight_read_by_another_op_is_not_dequantized():
    class ReadsPackedWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = qpass.quantize(nn.Linear(64, 8), "int8")

        def forward(self, x):
            return self.layer(x), self.layer.weight.sum()

    ep = torch.export.export(ReadsPackedWeight(), (torch.randn(2, 64),))
    with pytest.raises(ValueError, match="layer 'layer': its packed weight is also read by sum"):
        qpass.dequantize(ep)


@pytest.mark.parametrize("spec", ["nf4", "int8"])
def test_an_exported_quantized_module_dequantizes_as_the_module_does(spec):
    """Exporting a module quantized by the module front-end: packed weights are parameters there, and
    layers share one code book tensor, which export lifts once."""
    ids = torch.randint(0, 128, (2, 7))
    program = torch.export.export(qpass.quantize(CausalLMLogits(tiny_llama()), spec), (ids,))
    ep_d = qpass.dequantize(program)
    assert not _quantized_nodes(ep_d)
    module_d = qpass.dequantize(qpass.quantize(CausalLMLogits(tiny_llama()), spec))
    assert set(ep_d.state_dict) == set(module_d.state_dict())
    assert set(ep_d.graph_signature.parameters) == set(module_d.state_dict())
    with torch.no_grad():
        assert torch.equal(ep_d.module()(ids), module_d(ids))


def test_the_passes_keep_torch_exports_input_order_and_names():
    """Inputs stay in torch.export's order (parameters, buffers, constants, user inputs), the graph's
    placeholders in the signature's order, and a state input is named as export names it; dequantizing
    puts each parameter back where the quantizing pass took it from."""
    from torch.export.graph_signature import InputKind

    order = [InputKind.TOKEN, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR,
             InputKind.CUSTOM_OBJ, InputKind.USER_INPUT]
    prefix = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_"}
    ids = torch.randint(0, 128, (2, 7))
    ep = torch.export.export(CausalLMLogits(tiny_llama()), (ids,))
    ep_q = qpass.quantize(ep, qpass.QPassConfig("nf4", overrides={"*.self_attn.*": "int8"}))
    exported_module = torch.export.export(qpass.quantize(CausalLMLogits(tiny_llama()), "nf4"), (ids,))
    programs = {"quantized": ep_q, "dequantized": qpass.dequantize(ep_q),
                "float32 compute": qpass.set_compute_dtype(ep_q, torch.float32),
                "dequantized module export": qpass.dequantize(exported_module)}
    for what, program in programs.items():
        specs = program.graph_signature.input_specs
        kinds = [s.kind for s in specs]
        assert kinds == sorted(kinds, key=order.index), what
        assert InputKind.BUFFER in kinds and InputKind.USER_INPUT in kinds, what
        placeholders = [n.name for n in program.graph.nodes if n.op == "placeholder"]
        assert placeholders == [s.arg.name for s in specs], what
        for spec in specs:
            if spec.kind in prefix:
                assert spec.arg.name == (prefix[spec.kind] + spec.target.replace(".", "_")).lower(), (what, spec)
    # the round trip puts each parameter back where it was
    assert programs["dequantized"].graph_signature.parameters == ep.graph_signature.parameters
