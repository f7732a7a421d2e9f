"""qpass.dequantize: quantized layers back to full-precision nn.Linear / Conv1D, for transformers and PEFT."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import qpass
from qpass.integrations import peft as qpass_peft

from models import relative_error, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, qpass.QuantizedLinear)}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_each_layer_becomes_a_linear_holding_the_decoded_weight(fmt):
    model = qpass.quantize(tiny_llama(), fmt)
    layers = _quantized_layers(model)
    decoded = {name: layer.dequantize(torch.float32) for name, layer in layers.items()}
    biases = {name: layer.bias for name, layer in layers.items()}
    untouched = model.lm_head
    assert layers and not isinstance(untouched, qpass.QuantizedLinear)

    assert qpass.dequantize(model) is model
    assert not _quantized_layers(model)
    assert model.lm_head is untouched
    for name, weight in decoded.items():
        full = model.get_submodule(name)
        assert type(full) is torch.nn.Linear
        assert full.weight.dtype == torch.float32 and not full.weight.requires_grad
        assert torch.equal(full.weight, weight), name
        assert full.bias is biases[name]


def test_a_4bit_model_computes_the_same_after_dequantizing():
    model = qpass.quantize(tiny_llama(), qpass.NF4Config(compute_dtype=torch.float32))
    quantized = _logits(model)
    assert relative_error(_logits(qpass.dequantize(model)), quantized) < 1e-6


@pytest.mark.parametrize("source", ["quantized", "saved and loaded"])
def test_conv1d_layers_come_back_as_conv1d(source, tmp_path):
    """Also after a checkpoint round trip, which stores the weight [out, in] as bitsandbytes does: a
    Linear in its place would save transposed weights under GPT-2's names (silently wrong for square ones)."""
    from transformers.pytorch_utils import Conv1D

    model = qpass.quantize(tiny_gpt2(), qpass.FP4Config(compute_dtype=torch.float32))
    if source == "saved and loaded":
        qpass.save_pretrained(model, tmp_path)
        model = qpass.from_pretrained(tmp_path)
    decoded = {name: layer.dequantize(torch.float32) for name, layer in _quantized_layers(model).items()}
    quantized = _logits(model)
    qpass.dequantize(model)
    for name, weight in decoded.items():
        full = model.get_submodule(name)
        assert type(full) is Conv1D and torch.equal(full.weight, weight.t()), name  # Conv1D holds [in, out]
    assert relative_error(_logits(model), quantized) < 1e-6
    shapes = {k: v.shape for k, v in tiny_gpt2().state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_a_conv1d_quantized_without_its_bias_comes_back_with_a_zero_one():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = qpass.quantize(Conv1D(24, 16), qpass.NF4Config(compute_dtype=torch.float32), skip_modules=[])
    layer.bias = None  # a QuantizedLinear from a checkpoint without the bias
    x = torch.randn(3, 16)
    expected = layer(x)
    full = qpass.dequantize(layer)
    assert type(full) is Conv1D and full.bias.device == x.device  # not a meta placeholder
    assert relative_error(full(x), expected) < 1e-6


def test_dtype_follows_the_unquantized_parameters_unless_given():
    model = qpass.quantize(tiny_llama(dtype=torch.bfloat16), qpass.Int8Config(compute_dtype=torch.float32))
    qpass.dequantize(model)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    _logits(model)  # the layers take the activations they are given

    model = qpass.quantize(tiny_gpt2(), "nf4")
    qpass.dequantize(model, torch.float16)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.weight.dtype == layer.bias.dtype == torch.float16

    lone = qpass.quantize(torch.nn.Linear(64, 32), qpass.NF4Config(compute_dtype=torch.float16))
    alone = qpass.dequantize(lone)  # a lone layer: its bias is float32, the weight takes the compute dtype
    assert type(alone) is torch.nn.Linear and alone.weight.dtype == torch.float16


def test_transformers_model_dequantize_gives_a_plain_savable_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qpass.QPassConfig("nf4"),
                                                 device_map="cpu")
    model.save_pretrained(tmp_path / "nf4")  # which leaves model.config.dtype a name, dequantize's default
    model.dequantize()
    assert not _quantized_layers(model)
    assert getattr(model.config, "quantization_config", None) is None
    expected = _logits(model)
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")), expected)


def test_a_model_loaded_by_qpass_forgets_its_quantization_config(tmp_path):
    qpass.save_pretrained(qpass.quantize(tiny_llama(), "int8"), tmp_path / "q")
    model = qpass.from_pretrained(tmp_path / "q")
    assert model.config.quantization_config
    qpass.dequantize(model)
    assert getattr(model.config, "quantization_config", None) is None
    expected = _logits(model)
    model.save_pretrained(tmp_path / "plain")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")), expected)


@pytest.mark.parametrize(("build", "targets"), [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn"])])
def test_merging_into_a_dequantized_base_keeps_the_adapter_whole(build, targets):
    model = qpass.quantize(build(), qpass.NF4Config(compute_dtype=torch.float32))
    peft_model = qpass_peft.get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=build is tiny_gpt2,
                                     fan_in_fan_out=build is tiny_gpt2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapted = _logits(peft_model)
    with pytest.warns(UserWarning, match="re-quantizes"):  # the lossy merge, on a copy
        requantized = _logits(copy.deepcopy(peft_model).merge_and_unload())

    qpass.dequantize(peft_model)
    assert relative_error(_logits(peft_model), adapted) < 1e-6  # the unmerged adapter on the decoded base
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no re-quantization warning: nothing is re-quantized
        merged = peft_model.merge_and_unload()
    assert not _quantized_layers(merged)
    error = relative_error(_logits(merged), adapted)
    assert error < 1e-5, error
    assert relative_error(requantized, adapted) > 100 * error  # re-quantizing loses what this keeps


def test_an_accelerate_hook_moves_to_the_new_layer():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = qpass.quantize(tiny_llama(), "nf4")
    hook = AlignDevicesHook(execution_device="cpu", io_same_device=True)
    add_hook_to_module(model.model.layers[0].mlp.up_proj, hook)
    qpass.dequantize(model)
    assert model.model.layers[0].mlp.up_proj._hf_hook is hook
    _logits(model)


def test_what_cannot_be_dequantized_says_so():
    model = tiny_llama()
    assert qpass.dequantize(model) is model  # nothing quantized: left as it is
    with pytest.raises(TypeError, match="nn.Module or a torch.export.ExportedProgram"):
        qpass.dequantize("model")
    model = qpass.quantize(tiny_llama(), "nf4")
    model.model.layers[1].mlp.to("meta")  # as offloaded weights are
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.1\.mlp\.gate_proj'.*meta device"):
        qpass.dequantize(model)
    assert len(_quantized_layers(model)) == 14  # left as it was, not half dequantized
