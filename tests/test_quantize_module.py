"""The module front-end: which layers are replaced, transformers compatibility, errors, footprint."""

import gc
import json
import warnings
import weakref

import pytest
import torch
from torch import nn

import qpass
from qpass import QuantizedLinear

from models import relative_error, same_bytes, tiny_gpt2, tiny_llama


def _quantized(model):
    return {name: m.layout.config.format_name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def test_every_linear_but_lm_head_is_quantized():
    model = qpass.quantize(tiny_llama(), "nf4")
    names = _quantized(model)
    assert len(names) == 2 * 7 and set(names.values()) == {"nf4"}
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")


def test_overrides_by_glob_and_name_and_skip():
    plan = qpass.QPassConfig(
        "nf4",
        overrides={"*.self_attn.*": "int8", "model.layers.1.mlp.down_proj": None, "*.mlp.up_proj": qpass.FP4Config()},
        skip_modules=["model.layers.0.self_attn.o_proj"],
    )
    names = _quantized(qpass.quantize(tiny_llama(), plan))
    assert names["model.layers.0.self_attn.q_proj"] == "int8"
    assert "model.layers.0.self_attn.o_proj" not in names
    assert names["model.layers.1.mlp.up_proj"] == "fp4"
    assert names["model.layers.0.mlp.down_proj"] == "nf4"
    assert "model.layers.1.mlp.down_proj" not in names
    # as in transformers, an explicit skip list replaces the default ["lm_head"]
    assert names["lm_head"] == "nf4"



def test_an_override_that_quantizes_nothing_is_warned_of():
    """A mistyped override would leave its layers in the default format unnoticed: each front-end warns,
    naming the pattern and a real layer name, or, where the pattern matches only layers qpass cannot
    quantize, why. Overrides that match, or match only skipped or already quantized layers, are silent."""
    typo = {"*.self_atn.*": "int8", "*.mlp.*": "int8", "model.layers.0.self_attn.q_proj": None}
    warning = r"override '\*\.self_atn\.\*' matches no linear layer of LlamaForCausalLM; .* such as 'model\.layers\.0\."
    with pytest.warns(UserWarning, match=warning) as caught:
        model = qpass.quantize(tiny_llama(), "nf4", overrides=typo)
    assert sum("override" in str(w.message) for w in caught) == 1
    assert _quantized(model)["model.layers.1.mlp.up_proj"] == "int8"
    with pytest.warns(UserWarning, match="matches no linear layer of this exported program") as caught:
        program = torch.export.export(tiny_llama(), (), {"input_ids": torch.tensor([[1, 2]]), "use_cache": False})
        qpass.quantize(program, "nf4", overrides=typo)
    assert sum("override" in str(w.message) for w in caught) == 1
    with pytest.warns(UserWarning, match="matches no linear layer of LlamaForCausalLM"):
        qpass.estimate(tiny_llama().config, "nf4", overrides=typo)

    mha = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    with pytest.warns(UserWarning, match=r"'\*\.out_proj' has no effect on TransformerEncoderLayer: .*"
                                         r"'self_attn\.out_proj': MultiheadAttention reads its weight itself"):
        qpass.quantize(mha, "nf4", overrides={"*.out_proj": "int8"})

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qpass.quantize(model, "nf4", overrides={"*.mlp.*": "fp4"})  # quantized already
        qpass.quantize(tiny_llama(), "nf4", overrides={"lm_head": "int8"})  # skipped by default


def test_tied_output_embedding_is_left_alone():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qpass.quantize(model, "nf4", skip_modules=[])
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("spec", ["nf4", "int8"])
def test_layers_whose_torch_owner_reads_their_weight_are_left_alone(spec):
    """nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward, and
    nn.TransformerEncoderLayer hands linear1's and linear2's to a fused kernel in inference, instead of
    calling the layers: those stay nn.Linear, so the model runs in training and in inference (fused, or
    with a padding mask through nn.TransformerEncoder's nested tensors); the decoder layer's feed-forward
    layers, which it calls, are quantized. The graph front-end quantizes them all."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2)
    decoder = nn.TransformerDecoderLayer(64, 4, 128, batch_first=True)
    x, memory = torch.randn(2, 5, 64), torch.randn(2, 3, 64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    model = nn.ModuleDict({"encoder": encoder, "decoder": decoder}).eval()
    with torch.no_grad():
        expected = [encoder(x), encoder(x, src_key_padding_mask=padding), decoder(x, memory)]
    program = torch.export.export(encoder, (x,))

    qpass.quantize(model, spec, skip_modules=[])
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == {"decoder.linear1", "decoder.linear2"}
    with torch.no_grad():  # the fused inference paths
        assert torch.equal(encoder(x), expected[0])
        out = encoder(x, src_key_padding_mask=padding)
        assert torch.equal(out[~padding], expected[1][~padding])
        assert relative_error(decoder(x, memory), expected[2]) < 0.15
    model.train()
    encoder(x).sum().backward()  # the modules' own paths
    assert encoder.layers[0].linear1.weight.grad is not None

    program_q = qpass.quantize(program, spec, skip_modules=[])
    assert {"layers.0.self_attn.out_proj.absmax" if spec == "nf4" else "layers.0.self_attn.out_proj.SCB",
            f"layers.1.linear2.{'absmax' if spec == 'nf4' else 'SCB'}"} <= set(program_q.state_dict)
    assert relative_error(program_q.module()(x), expected[0]) < 0.15


def test_quantizing_twice_changes_nothing():
    model = qpass.quantize(tiny_llama(), "nf4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qpass.quantize(model, "int8")
    assert set(_quantized(model).values()) == {"nf4"}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# Relative logit error of a 2-layer random Llama against fp32: loose bounds that still catch a broken
# layer (a wrong nibble order or scale gives errors near 1). FP4's code is coarser than NF4's on
# normally distributed weights.
MODEL_ERROR = {"nf4": 0.15, "fp4": 0.25, "int8": 0.03, "nf4-128": 0.15}
SPECS = {"nf4": "nf4", "fp4": "fp4", "int8": "int8", "nf4-128": qpass.NF4Config(double_quant=False, blocksize=128)}


@pytest.mark.parametrize("name", SPECS)
def test_transformers_model_keeps_working(name):
    spec = SPECS[name]
    fp = tiny_llama()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = fp(ids).logits
    model = qpass.quantize(tiny_llama(), spec)
    with torch.no_grad():
        out = model(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert rel < MODEL_ERROR[name], rel
    generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    assert model.config.to_dict()["hidden_size"] == 64


def test_state_dict_uses_bitsandbytes_names():
    model = qpass.quantize(tiny_llama(), "nf4")
    keys = [k for k in model.state_dict() if k.startswith("model.layers.0.self_attn.q_proj.")]
    assert sorted(keys) == sorted(
        f"model.layers.0.self_attn.q_proj.{n}"
        for n in ("weight", "quant_map", "absmax", "nested_absmax", "nested_quant_map", "offset")
    )
    int8 = qpass.quantize(tiny_llama(), "int8")
    assert int8.state_dict()["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert "model.layers.0.mlp.up_proj.SCB" in int8.state_dict()


def test_dtype_casts_do_not_touch_quantized_tensors():
    model = qpass.quantize(tiny_llama(), qpass.NF4Config(quant_storage=torch.bfloat16))
    layer = model.model.layers[0].mlp.up_proj
    packed, absmax = layer.weight.clone(), layer.absmax.clone()
    model.half()
    assert layer.weight.dtype == torch.bfloat16
    assert same_bytes(layer.weight, packed)
    assert torch.equal(layer.absmax, absmax)
    out = model(torch.randint(0, 128, (1, 5))).logits
    assert out.dtype == torch.float16 and not out.isnan().any()


@pytest.mark.parametrize(("spec", "tensor_name", "cast_to"), [
    ("nf4", "nested_absmax", torch.bfloat16),  # FSDP1's MixedPrecision(buffer_dtype=bf16) on the scales
    (qpass.NF4Config(double_quant=False), "absmax", torch.float16),
    (qpass.NF4Config(quant_storage=torch.bfloat16), "weight", torch.float16),  # codes held as bf16, cast
    ("int8", "SCB", torch.bfloat16),
])
def test_a_quantized_tensor_cast_in_place_is_refused_naming_the_layer(spec, tensor_name, cast_to):
    """``model.half()`` cannot cast the quantized tensors, but ``tensor.data = ...`` can, behind the
    module's back: the layer then refuses to compute rather than use corrupted codes or rounded scales."""
    model = qpass.quantize(tiny_llama(), spec)
    tensor = getattr(model.model.layers[1].mlp.up_proj, tensor_name)
    expected = tensor.dtype
    tensor.data = tensor.to(cast_to)
    with pytest.raises(TypeError, match=rf"layer 'model\.layers\.1\.mlp\.up_proj' \(\w+, 128x64\): its quantized "
                                        rf"tensor '{tensor_name}' is {cast_to}, but the format holds it as {expected}"):
        model(torch.randint(0, 128, (1, 5)))


@pytest.mark.parametrize("spec", ["nf4", "int8"])
def test_packed_weights_are_frozen_parameters_and_the_rest_buffers(spec):
    """As bitsandbytes' Params4bit / Int8Params: the packed codes are a frozen parameter (what FSDP2
    shards), kept as the same object and the same bytes through casts, moves, attribute assignment (as
    transformers and FSDP2 set it) and re-quantizing."""
    model = qpass.quantize(tiny_llama(), spec)
    layer = model.model.layers[0].mlp.up_proj
    weight, packed = layer.weight, layer.weight.detach().clone()
    assert isinstance(weight, nn.Parameter) and not weight.requires_grad and not weight.is_floating_point()
    assert [n for n, _ in layer.named_parameters()] == ["weight"]  # tiny_llama's linears have no bias
    assert {n for n, _ in layer.named_buffers()} == {
        n for n, t in layer.quantized_tensors.items() if t is not None} - {"weight"}

    model.to(torch.bfloat16).to("cpu").float()
    assert layer.weight is weight and torch.equal(weight, packed)

    layer.weight = packed.clone()  # a plain tensor set as an attribute becomes the frozen parameter
    assert isinstance(layer.weight, nn.Parameter) and "weight" not in layer._buffers
    given = nn.Parameter(packed.clone(), requires_grad=False)
    layer.weight = given  # a parameter set as an attribute is kept as it is
    assert layer.weight is given
    layer.requantize_(layer.dequantize(torch.float32))
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad


def test_packed_weights_in_a_float_quant_storage_are_buffers():
    """Codes viewed as bf16 stay a buffer: as a float parameter they would be cast by whatever casts
    float parameters (PEFT's prepare_model_for_kbit_training: tests/test_peft.py)."""
    model = qpass.quantize(tiny_llama(), qpass.NF4Config(quant_storage=torch.bfloat16))
    layer = model.model.layers[0].mlp.up_proj
    assert "weight" in layer._buffers and not dict(layer.named_parameters())
    layer.weight = nn.Parameter(layer.weight.clone(), requires_grad=True)  # as transformers sets a float tensor
    assert "weight" in layer._buffers and not layer.weight.requires_grad


@pytest.mark.parametrize("spec", ["nf4", "int8"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_leaves_the_quantized_layers_alone(spec, autocast_dtype):
    """Mixed-precision training (the HF Trainer's bf16=True, accelerate) runs the model under autocast.
    autocast has no rule for qpass' ops, so a layer computes in its compute dtype as without autocast,
    forward and backward, as bitsandbytes' layers do."""
    layer = qpass.quantize(nn.Linear(64, 32, bias=True), spec)
    x = torch.randn(3, 64, requires_grad=True)
    expected = layer(x)
    (grad,) = torch.autograd.grad(expected.sum(), x)
    with torch.autocast("cpu", dtype=autocast_dtype):  # backward too, though it is usually called outside
        out = layer(x)
        (autocast_grad,) = torch.autograd.grad(out.sum(), x)
    assert out.dtype == torch.float32 and torch.equal(out, expected) and torch.equal(autocast_grad, grad)


@pytest.mark.parametrize("config_type", [qpass.NF4Config, qpass.FP4Config, qpass.Int8Config])
def test_set_compute_dtype_is_quantizing_with_that_dtype(config_type, tmp_path):
    ids = torch.randint(0, 128, (2, 9))
    model = qpass.quantize(tiny_llama(), config_type(compute_dtype=torch.bfloat16))
    want = qpass.quantize(tiny_llama(), config_type(compute_dtype=torch.float32))
    before = model(ids).logits
    assert qpass.set_compute_dtype(model, torch.float32) is model
    layer = model.model.layers[1].mlp.down_proj
    assert layer.layout == want.model.layers[1].mlp.down_proj.layout
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    after = model(ids).logits
    assert torch.equal(after, want(ids).logits) and not torch.equal(after, before)
    qpass.save_pretrained(model, tmp_path)  # the checkpoint records the new dtype
    loaded = qpass.from_pretrained(tmp_path).model.layers[1].mlp.down_proj
    assert loaded.layout.config.compute_dtype == torch.float32


def test_set_compute_dtype_refuses_what_a_config_refuses():
    model = qpass.quantize(tiny_llama(), "nf4")
    refusal = r"layer 'model.layers.0.self_attn.q_proj': NF4Config: compute_dtype=torch.int8 is not supported"
    with pytest.raises(ValueError, match=refusal):
        qpass.set_compute_dtype(model, torch.int8)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert {layer.layout.config.compute_dtype for layer in layers} == {torch.bfloat16}
    with pytest.raises(TypeError, match="nn.Module or a torch.export.ExportedProgram"):
        qpass.set_compute_dtype("model", torch.float32)


def test_conv1d_layers_of_gpt2():
    fp = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = fp(ids).logits
    model = qpass.quantize(tiny_gpt2(), "int8")
    names = _quantized(model)
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    layer = model.transformer.h[0].attn.c_attn
    assert (layer.in_features, layer.out_features) == (64, 192)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.05


def test_lora_trains_through_a_frozen_quantized_base():
    """A LoRA adapter on layer 1 learns through quantized layer 2: its gradient crosses the qpass op."""
    torch.manual_seed(3)
    base = qpass.quantize(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)),
                          qpass.NF4Config(compute_dtype=torch.float32))
    lora_a = nn.Parameter(torch.randn(4, 32) * 0.1)
    lora_b = nn.Parameter(torch.zeros(32, 4))
    true_a, true_b = torch.randn(4, 32) * 0.3, torch.randn(32, 4) * 0.3

    def forward(a, b, x):
        return base[1](base[0](x) + x @ a.T @ b.T)

    x = torch.randn(256, 32)
    with torch.no_grad():
        target = forward(true_a, true_b, x)
    opt = torch.optim.Adam([lora_a, lora_b], lr=3e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(forward(lora_a, lora_b, x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert all(t is None or not t.requires_grad for layer in base for t in layer.quantized_tensors.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec": "nf5"}, r"unknown quantization format 'nf5'; use one of \['fp4', 'int8', 'nf4'\]"),
        ({"spec": qpass.NF4Config}, r"expected a format name"),
    ],
)
def test_bad_format_names(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        qpass.quantize(nn.Linear(4, 4), kwargs["spec"])


def test_bad_config_values():
    with pytest.raises(ValueError,
                       match=r"NF4Config: blocksize=100 is not supported; use a power of two from 32 to 4096"):
        qpass.NF4Config(blocksize=100)
    with pytest.raises(ValueError, match=r"FP4Config: compute_dtype=torch.int8 is not supported; use one of bfloat16"):
        qpass.FP4Config(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"Int8Config: threshold=-1 must be a finite number >= 0"):
        qpass.Int8Config(threshold=-1)
    with pytest.raises(ValueError, match=r"NF4Config: double_quant='false' must be True or False"):
        qpass.QPassConfig.from_dict({"default": {"format": "nf4", "double_quant": "false"}})  # a hand-edited config


def test_plans_read_back_what_to_dict_writes():
    """transformers writes a QPassConfig into config.json with to_dict and reads it back with from_dict;
    a mixed-format checkpoint's own form ("layers") reads as exact names with nothing else quantized."""
    plan = qpass.QPassConfig(qpass.NF4Config(blocksize=128, compute_dtype=torch.float16),
                             overrides={"*.self_attn.*": qpass.Int8Config(threshold=4.5), "*.mlp.down_proj": None,
                                        "model.layers.0.mlp.up_proj": qpass.FP4Config(quant_storage=torch.bfloat16)},
                             skip_modules=["lm_head", "*.gate_proj"], skip_offloaded=True)
    assert qpass.QPassConfig.from_dict(json.loads(plan.to_json_string())) == plan
    layer = {"format": "int8", "threshold": 6.0, "compute_dtype": "float32"}
    stored = {"quant_method": "qpass", "llm_int8_skip_modules": ["lm_head"],
              "layers": {"model.layers.0.mlp.up_proj": layer}}
    read = qpass.QPassConfig.from_dict(stored)
    assert read.config_for("model.layers.0.mlp.up_proj") == qpass.Int8Config(compute_dtype=torch.float32)
    assert read.config_for("model.layers.1.mlp.up_proj") is None and read.config_for("lm_head") is None
    with pytest.raises(ValueError, match=r"unknown quantization format 'nf5'.*qpass knows \['fp4', 'int8', 'nf4'\]"):
        qpass.QPassConfig.from_dict({"quant_method": "qpass", "layers": {"a": {"format": "nf5"}}})
    with pytest.raises(ValueError, match=r"NF4Config has no field 'group_size'"):
        qpass.QPassConfig.from_dict({"default": {"format": "nf4", "group_size": 64}})
    with pytest.raises(ValueError, match=r"not a qpass quantization config"):
        qpass.QPassConfig.from_dict({"quant_method": "bitsandbytes", "load_in_4bit": True})


def test_bad_weights_name_the_layer():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 8))
    with torch.no_grad():
        model.proj.weight[2, 3] = float("nan")
    with pytest.raises(qpass.QuantizationError,
                       match=r"layer 'proj': weight holds 1 NaN/Inf value\(s\).*skip_modules=\['proj'\]"):
        qpass.quantize(model, "nf4")
    model.proj.weight.data = model.proj.weight.data.to(torch.float64)
    with pytest.raises(qpass.QuantizationError, match=r"layer 'proj': weight dtype torch.float64 cannot be quantized"):
        qpass.quantize(model, "int8")
    # a weight on the meta device among loaded ones: test_a_meta_model_quantizes_to_a_skeleton...


def test_a_meta_model_quantizes_to_a_skeleton_that_load_state_dict_fills(tmp_path):
    """gpt-fast's way of loading: build on the meta device, quantize with the plan the file was written
    with, then load_state_dict(assign=True), with no full-precision weight ever made."""
    def build():
        return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64, bias=False), nn.Linear(64, 33))

    plan = {"overrides": {"2": "int8", "3": qpass.FP4Config(double_quant=False, quant_storage=torch.bfloat16)}}
    torch.manual_seed(0)
    quantized = qpass.quantize(build(), "nf4", **plan)
    torch.save(quantized.state_dict(), tmp_path / "model.pt")
    with torch.device("meta"):
        skeleton = build()
    qpass.quantize(skeleton, "nf4", **plan)
    expected = quantized.state_dict()
    assert {k: (t.shape, t.dtype, t.device.type) for k, t in skeleton.state_dict().items()} == {
        k: (t.shape, t.dtype, "meta") for k, t in expected.items()}
    skeleton.load_state_dict(torch.load(tmp_path / "model.pt", mmap=True, weights_only=True), assign=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(skeleton(x), quantized(x))

    with torch.device("meta"):  # or given storage first, then filled by copying
        skeleton = qpass.quantize(build(), "nf4", **plan)
    skeleton.half()  # a dtype cast leaves the quantized placeholders' dtypes alone, as for real ones
    skeleton.to_empty(device="cpu").float().load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(skeleton(x), quantized(x))
    with torch.device("meta"):
        skeleton = qpass.quantize(build(), "nf4", **plan)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        skeleton.to("cpu")  # torch's own error: a placeholder holds no values to move

    half_loaded = build()
    half_loaded[2] = nn.Linear(96, 64, bias=False, device="meta")
    with pytest.raises(qpass.QuantizationError, match=r"layer '2': its weight is on the meta device \(not loaded\)"):
        qpass.quantize(half_loaded, "nf4")


def test_impossible_quant_storage_names_the_layer():
    model = nn.Sequential()
    model.add_module("odd", nn.Linear(5, 5))  # 25 weights: 13 packed bytes, not a multiple of 4
    with pytest.raises(qpass.QuantizationError, match=r"layer 'odd': quant_storage=torch.float32 needs the packed size "
                                                      r"\(13 bytes for \(5, 5\)\) to be a multiple of 4 bytes"):
        qpass.quantize(model, qpass.NF4Config(quant_storage=torch.float32))


def test_device_moves_and_config_saving(tmp_path):
    model = qpass.quantize(tiny_llama(), "nf4")
    model.cpu().to("cpu")
    model.config.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    meta = qpass.quantize(tiny_llama(), "int8").to("meta")
    assert meta.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert meta.model.layers[0].mlp.up_proj.weight.dtype == torch.int8


def test_a_bare_linear_is_returned_quantized():
    layer = qpass.quantize(nn.Linear(16, 8), "fp4")
    assert isinstance(layer, QuantizedLinear)
    assert layer(torch.randn(2, 16)).shape == (2, 8)


@pytest.mark.parametrize(("spec", "bits"), [("nf4", 4.127), ("fp4", 4.127), (qpass.NF4Config(double_quant=False), 4.5)])
def test_footprint_bits_per_weight(spec, bits):
    model = qpass.quantize(tiny_llama(), spec)
    fp = qpass.footprint(model)
    assert len(fp.layers) == 14
    # tiny layers round the nested-absmax count up: within 0.02 bits of the large-layer figure
    assert abs(fp.bits_per_quantized_weight - bits) < 0.02, fp.bits_per_quantized_weight
    assert fp.fp32_bytes == 2 * fp.fp16_bytes and fp.total_bytes < fp.fp32_bytes
    assert "model:" in str(fp)


def test_footprint_int8_bits():
    model = qpass.quantize(tiny_llama(), "int8")
    for layer in qpass.footprint(model).layers:
        in_features = model.get_submodule(layer.name).in_features
        assert layer.bits_per_weight == pytest.approx(8 + 32 / in_features)


def test_original_weights_are_freed():
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(4)])
    weak = [weakref.ref(m.weight) for m in model]
    qpass.quantize(model, "nf4")
    gc.collect()
    assert all(w() is None for w in weak), "an original fp32 weight is still alive after quantize()"
