"""AutoModelForCausalLM.from_pretrained(..., quantization_config=qpass.QPassConfig(...))."""

import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qpass

from models import relative_error, same_bytes, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_t5


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    tiny_llama().save_pretrained(path)
    return path


def test_from_pretrained_with_a_qpass_config(fp_checkpoint, tmp_path):
    plan = qpass.QPassConfig("nf4", overrides={"*.self_attn.*": "int8"})
    model, info = AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=plan, device_map="cpu",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # absmax, SCB, ... are made, not missing
    assert isinstance(model.model.layers[0].self_attn.q_proj, qpass.QuantizedLinear)
    assert model.model.layers[0].self_attn.q_proj.layout.config.format_name == "int8"
    assert isinstance(model.lm_head, torch.nn.Linear)
    ids = torch.randint(0, 128, (1, 7))
    expected = qpass.quantize(tiny_llama(), plan)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
    assert '"quant_method": "qpass"' in model.config.to_json_string()
    # transformers' save writes what qpass.save_pretrained writes: the same tensors and config.json
    model.save_pretrained(tmp_path / "hf")
    qpass.save_pretrained(model, tmp_path / "q")
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_text() == (tmp_path / "q" / name).read_text(), name
    theirs, ours = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "q" / "model.safetensors")
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[key], ours[key]) for key in ours)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["layers"][
        "model.layers.0.self_attn.q_proj"]["format"] == "int8"
    assert torch.equal(qpass.from_pretrained(tmp_path / "hf")(ids).logits, model(ids).logits)


def test_save_pretrained_round_trips_through_transformers_and_bitsandbytes(fp_checkpoint, tmp_path):
    """The bitsandbytes user's loop, in transformers alone: load with a QPassConfig, model.save_pretrained
    (sharded), and the folder loads in transformers + bitsandbytes, and back in qpass, bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=qpass.QPassConfig("nf4"),
                                                 device_map="cpu")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        # dtype: transformers 4 would load the layers bitsandbytes leaves alone in float16
        bnb = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", device_map="cpu", dtype=torch.float32)
        assert type(bnb.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        assert same_bytes(bnb.model.layers[0].mlp.up_proj.weight.data, model.model.layers[0].mlp.up_proj.weight)
        assert relative_error(bnb(ids).logits, expected) <= 1e-6  # as tests/models.py's BNB_AGREEMENT
        assert torch.equal(qpass.from_pretrained(tmp_path / "hf")(ids).logits, expected)


@pytest.mark.skipif(not transformers.__version__.startswith("4."), reason="transformers 5 writes safetensors only")
def test_pickled_save_is_refused_with_what_to_do(fp_checkpoint, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=qpass.QPassConfig("nf4"))
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "hf", safe_serialization=False)
    assert "safe_serialization=True" in caplog.text


def test_generate_compiles_with_a_static_cache(fp_checkpoint):
    """transformers' generate compiles the forward for a static cache only when the quantizer says the
    model is compileable; otherwise it warns and runs eager. Compiled with fullgraph, so a graph break
    fails; float32 compute, so compiled and eager round alike and the tokens must be equal."""
    from transformers import CompileConfig

    plan = qpass.QPassConfig(qpass.NF4Config(compute_dtype=torch.float32),
                             overrides={"*.mlp.down_proj": qpass.Int8Config(compute_dtype=torch.float32)})
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=plan)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    torch._dynamo.reset()
    compiled = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call"), "generate did not compile the model"
    assert torch.equal(compiled, eager)


# The tiny Llama's modules with layer 1 on the disk: accelerate offloads it, the rest runs on the CPU.
LAYER_1_ON_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                   "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("device_map", [LAYER_1_ON_DISK, "auto"])
def test_offloading_quantized_layers_is_refused_with_what_to_do(fp_checkpoint, tmp_path, device_map):
    """accelerate offloads parameters, and a qpass layer holds its scales in buffers: refused before
    loading, for a map given as such and for one transformers infers from too little max_memory."""
    with pytest.raises(ValueError, match=r"offloads 'model.layers.1.self_attn.q_proj', .* and 4 more to the CPU or the "
                                         r"disk.*skip_offloaded=True.*qpass.estimate" if device_map is LAYER_1_ON_DISK
                       else r"offloads .* to the CPU or the disk.*qpass.estimate"):
        AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=qpass.QPassConfig("nf4"),
                                             device_map=device_map, max_memory={"cpu": "40KB"},
                                             offload_folder=tmp_path / "offload")


def _offloaded_load(fp_checkpoint, tmp_path, plan, device_map):
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=plan, device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    for name, place in device_map.items():  # offloaded: on the meta device, read from the disk at each call
        assert all((p.device.type == "meta") == (place == "disk") for p in model.get_submodule(name).parameters())
    return model


def test_modules_left_in_full_precision_offload_as_usual(fp_checkpoint, tmp_path):
    """The output layer is not quantized by default, so a map may put it on the disk."""
    model = _offloaded_load(fp_checkpoint, tmp_path, qpass.QPassConfig("nf4"), {"model": "cpu", "lm_head": "disk"})
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, qpass.quantize(tiny_llama(), "nf4")(ids).logits)


@pytest.mark.parametrize("plan", [qpass.QPassConfig("nf4", skip_offloaded=True),
                                  qpass.QPassConfig.from_bitsandbytes(transformers.BitsAndBytesConfig(
                                      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      llm_int8_enable_fp32_cpu_offload=True))], ids=["qpass", "bitsandbytes"])
def test_skip_offloaded_leaves_offloaded_layers_in_full_precision(fp_checkpoint, tmp_path, plan):
    """bitsandbytes' llm_int8_enable_fp32_cpu_offload: the layers a device_map offloads stay unquantized,
    for accelerate to offload; the others are quantized as without the map."""
    model = _offloaded_load(fp_checkpoint, tmp_path, plan, LAYER_1_ON_DISK)
    assert not any(isinstance(m, qpass.QuantizedLinear) for m in model.model.layers[1].modules())
    assert isinstance(model.model.layers[0].mlp.up_proj, qpass.QuantizedLinear)
    expected = qpass.quantize(tiny_llama(), dataclasses.replace(plan, skip_modules=["lm_head", "model.layers.1.*"]))
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)


def test_device_map_sizes_the_quantized_layers(fp_checkpoint):
    """device_map="auto" places modules by the size transformers gives their tensors, which for qpass are
    the quantized buffers: a budget that holds the NF4 model but not the float32 one loads it whole."""
    plan = qpass.QPassConfig("nf4")
    budget = {"cpu": int(1.3 * qpass.footprint(AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=plan)).total_bytes)}
    assert budget["cpu"] < sum(p.numel() * p.element_size() for p in tiny_llama().parameters()) / 2
    # sized as float32, modules would go to disk, which is refused
    AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=plan, device_map="auto",
                                         max_memory=budget)


def test_conv1d_models_through_transformers(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", quantization_config=qpass.QPassConfig("fp4"),
                                                 device_map="cpu")
    assert isinstance(model.transformer.h[0].attn.c_attn, qpass.QuantizedLinear)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, qpass.quantize(tiny_gpt2(), "fp4")(ids).logits)


def test_siglips_attention_pooling_head_loads_and_runs(tmp_path):
    """SigLIP's pooling head is an nn.MultiheadAttention, which reads out_proj.weight itself
    (bitsandbytes quantizes it and the forward fails: bitsandbytes#963); qpass leaves it in full
    precision, as the module front-end does, and quantizes the rest."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    torch.manual_seed(0)
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    model = SiglipVisionModel.from_pretrained(tmp_path / "siglip", quantization_config=qpass.QPassConfig("nf4"),
                                              device_map="cpu", dtype=torch.float32)
    assert type(model.head.attention.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.head.mlp.fc1, qpass.QuantizedLinear)
    pixels = torch.randn(2, 3, 32, 32)
    expected = qpass.quantize(SiglipVisionModel.from_pretrained(tmp_path / "siglip", dtype=torch.float32), "nf4")
    with torch.no_grad():
        assert torch.equal(model(pixels).pooler_output, expected(pixels).pooler_output)


def test_tied_output_layer_is_left_alone(tmp_path):
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    plan = qpass.QPassConfig("nf4", skip_modules=[])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", quantization_config=plan)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight


def test_no_device_map_loads_onto_the_gpu_when_there_is_one(fp_checkpoint):
    """As with bitsandbytes: no device_map and a GPU, the model is quantized and runs on the GPU."""
    plan = qpass.QPassConfig("nf4")
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=plan)
    place = "cuda" if torch.cuda.is_available() else "cpu"
    assert {t.device.type for t in model.state_dict().values()} == {place}
    ids = torch.randint(0, 128, (1, 7), device=place)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, qpass.quantize(tiny_llama().to(place), plan)(ids).logits)


def test_importing_qpass_does_not_import_transformers():
    code = "import sys, qpass; qpass.QPassConfig('nf4'); assert 'transformers' not in sys.modules, 'imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


MIXED = qpass.QPassConfig("nf4", overrides={"*.self_attn.*": "int8",
                                           "*.mlp.down_proj": qpass.FP4Config(blocksize=128, double_quant=False)})
needs_transformers_5 = pytest.mark.skipif(transformers.__version__.startswith("4."),
                                          reason="transformers 4 refuses qpass checkpoints (tested below)")


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "llama"
    qpass.save_pretrained(qpass.quantize(tiny_llama(), MIXED), path, max_shard_size="20KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1  # a layer's tensors may span shards
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "qpass"
    return path


@needs_transformers_5
def test_a_quantized_checkpoint_refuses_to_offload_its_quantized_layers(mixed_checkpoint, tmp_path):
    """Its layers are stored quantized: no full-precision way out to offer, and lm_head may still go."""
    with pytest.raises(ValueError, match=r"offloads 'model.layers.1.self_attn.q_proj', .* and 4 more .*"
                                         r"This checkpoint stores them quantized. Or give the devices"):
        AutoModelForCausalLM.from_pretrained(mixed_checkpoint, device_map=LAYER_1_ON_DISK,
                                             offload_folder=tmp_path / "offload")
    model = AutoModelForCausalLM.from_pretrained(mixed_checkpoint, device_map={"model": "cpu", "lm_head": "disk"},
                                                 offload_folder=tmp_path / "offload")
    assert model.lm_head.weight.device.type == "meta"  # offloaded
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, qpass.from_pretrained(mixed_checkpoint)(ids).logits)


@needs_transformers_5
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_mixed_format_checkpoint_loads_through_transformers(mixed_checkpoint, tmp_path, dtype):
    """A checkpoint with several formats (quant_method "qpass") loads in transformers as it does in
    qpass.from_pretrained: the same layers, layouts, tensors (dtypes included) and logits; saved again
    through transformers it writes the same tensors and quantization_config."""
    model, info = AutoModelForCausalLM.from_pretrained(mixed_checkpoint, device_map="cpu", dtype=dtype,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = qpass.from_pretrained(mixed_checkpoint, dtype=dtype)
    ours, theirs = dict(model.named_modules()), dict(expected.named_modules())
    quantized = [name for name, module in theirs.items() if isinstance(module, qpass.QuantizedLinear)]
    assert len(quantized) == 14
    assert all(isinstance(ours[name], qpass.QuantizedLinear) and ours[name].layout == theirs[name].layout
               for name in quantized)
    assert ours["model.layers.1.mlp.down_proj"].layout.config == qpass.FP4Config(blocksize=128, double_quant=False)
    state, expected_state = model.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(state[k].dtype == expected_state[k].dtype and torch.equal(state[k], expected_state[k]) for k in state)
    assert model.model.norm.weight.dtype == (dtype or torch.float32)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
    model.save_pretrained(tmp_path / "again")
    stored = json.loads((mixed_checkpoint / "config.json").read_text())["quantization_config"]
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"] == stored
    if dtype is None:
        first, again = _stored_tensors(mixed_checkpoint), _stored_tensors(tmp_path / "again")
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def _stored_tensors(folder):
    return {key: t for file in sorted(folder.glob("*.safetensors")) for key, t in load_file(file).items()}


@needs_transformers_5
def test_a_mixed_format_conv1d_checkpoint_loads_through_transformers(tmp_path):
    """GPT-2's Conv1D layers, stored [out, in] with their biases, load as qpass.from_pretrained loads
    them, and dequantize back to Conv1D."""
    qpass.save_pretrained(qpass.quantize(tiny_gpt2(), qpass.QPassConfig("fp4", overrides={"*.attn.*": "int8"})),
                          tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    expected = qpass.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
    assert model.transformer.h[0].attn.c_attn.layout.config.format_name == "int8"
    assert type(qpass.dequantize(model).transformer.h[0].mlp.c_fc).__name__ == "Conv1D"


@needs_transformers_5
@pytest.mark.parametrize("first", ["import qpass", "import transformers.modeling_utils"])
def test_import_qpass_is_all_transformers_needs_for_a_qpass_checkpoint(mixed_checkpoint, first):
    """No QPassConfig in the call: transformers finds qpass by the checkpoint's quant_method once qpass is
    imported, before or after transformers' model loading."""
    second = "import transformers.modeling_utils" if first == "import qpass" else "import qpass"
    code = (f"import sys\n{first}\n{second}\nfrom transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map='cpu')\n"
            "assert type(model.model.layers[0].self_attn.q_proj).__name__ == 'QuantizedLinear'\n")
    out = subprocess.run([sys.executable, "-c", code, str(mixed_checkpoint)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("loader", ["transformers", "qpass"])
@pytest.mark.parametrize(("edit", "message"), [
    (lambda layers: layers.pop("model.layers.1.mlp.up_proj"),
     "model.layers.1.mlp.up_proj: quantized in the checkpoint, but its quantization_config does not list it"),
    (lambda layers: layers.update(lm_head={"format": "nf4"}),
     "lm_head: quantization_config lists it as nf4, but the checkpoint holds it in full precision"),
    (lambda layers: layers["model.layers.0.mlp.down_proj"].update(blocksize=64),
     r"model.layers.0.mlp.down_proj: the checkpoint holds a FP4Config\(blocksize=128.*its quantization_config "
     r"says FP4Config\(blocksize=64"),
], ids=["unlisted layer", "listed layer in full precision", "contradicting blocksize"])
def test_a_qpass_checkpoint_that_contradicts_its_config_is_refused(mixed_checkpoint, tmp_path, caplog, edit, message,
                                                                    loader):
    """Both loaders read a layer through bnb_layout.listed_layer_from_bnb. transformers collects its
    conversion errors into its load report, then raises."""
    broken = _with_layers_edited(mixed_checkpoint, tmp_path / "broken", edit)
    if loader == "qpass":
        with pytest.raises(qpass.CheckpointError, match=message):
            qpass.from_pretrained(broken)
        return
    if transformers.__version__.startswith("4."):
        pytest.skip("transformers 4 refuses qpass checkpoints")
    with pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(broken, device_map="cpu")
    assert re.search(message, caplog.text)


def test_an_unreadable_qpass_quantization_config_is_refused(mixed_checkpoint, tmp_path):
    broken = _with_layers_edited(mixed_checkpoint, tmp_path / "broken",
                                 lambda layers: layers["model.layers.0.mlp.up_proj"].update(format="nf5"))
    with pytest.raises(qpass.CheckpointError, match=r"broken: config.json's quantization_config is not one qpass reads "
                                                    r"\(unknown quantization format 'nf5'"):
        qpass.from_pretrained(broken)
    with pytest.raises(ValueError, match=r"unknown quantization format 'nf5'"):
        AutoModelForCausalLM.from_pretrained(broken)


def _with_layers_edited(checkpoint, copy, edit):
    """A copy of ``checkpoint`` with ``edit`` applied to its quantization_config's layers."""
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config["quantization_config"]["layers"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.skipif(not transformers.__version__.startswith("4."), reason="transformers 5 loads qpass checkpoints")
def test_transformers_4_refuses_a_qpass_checkpoint_with_what_to_do(mixed_checkpoint):
    with pytest.raises(ValueError, match=r"needs transformers >= 5; on transformers 4 load it with "
                                         r"qpass.from_pretrained"):
        AutoModelForCausalLM.from_pretrained(mixed_checkpoint)


def test_a_transformers_qpass_cannot_register_with_still_imports():
    """The registration runs inside the user's import of transformers: if it fails (here: the
    integration module cannot be imported), transformers imports anyway, with a warning that says so."""
    code = ("import sys, warnings\nimport qpass\nsys.modules['qpass.integrations.transformers'] = None\n"
            "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
            "    import transformers.modeling_utils\n"
            "print([str(w.message) for w in caught if 'qpass could not register' in str(w.message)])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "qpass could not register with transformers" in out.stdout, out.stdout
    assert "ModuleNotFoundError" in out.stdout, out.stdout


SELECTION_CASES = {  # saved model, the class that loads it, what the default leaves out (as bitsandbytes)
    "llama causal LM": (tiny_llama, "AutoModelForCausalLM"),  # lm_head
    "llama classifier from a causal LM": (tiny_llama, "AutoModelForSequenceClassification"),  # score, new
    "bert classifier": (tiny_bert_classifier, "AutoModelForSequenceClassification"),  # classifier
    "t5": (tiny_t5, "AutoModelForSeq2SeqLM"),  # every "wo" (_keep_in_fp32_modules), and lm_head (tied)
    "gpt2": (tiny_gpt2, "AutoModelForCausalLM"),  # Conv1D layers; lm_head (tied)
}


@pytest.mark.parametrize("skip_modules", [None, []], ids=["default skips", "no skips"])
@pytest.mark.parametrize("case", SELECTION_CASES)
def test_the_layers_quantized_are_those_bitsandbytes_quantizes(case, skip_modules, tmp_path):
    """transformers + bitsandbytes and qpass, given the same BitsAndBytesConfig, quantize the same
    layers: by default not the output layer nor the layer holding the last parameter (a classifier
    head, missing from a causal LM's checkpoint and initialised at random), and never a model's
    _keep_in_fp32_modules; through transformers, and with qpass.quantize on the model in memory."""
    from transformers import BitsAndBytesConfig

    build, auto_class = SELECTION_CASES[case]
    build().save_pretrained(tmp_path)
    auto = getattr(transformers, auto_class)
    options = {"num_labels": 3} if "Classification" in auto_class else {}
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip_modules)
    if skip_modules == [] and case in ("t5", "gpt2", "llama classifier from a causal LM") and \
            transformers.__version__.startswith("4."):
        pytest.skip("transformers 4 + bitsandbytes fail to load a quantized layer the checkpoint has no weight for "
                    "(tied, or new); transformers 5 loads it, and the comparison runs there")
    theirs = auto.from_pretrained(tmp_path, quantization_config=bnb_config, device_map="cpu", **options)
    expected = {name for name, module in theirs.named_modules() if type(module).__name__ == "Linear4bit"}
    if case == "bert classifier" and skip_modules is None and not transformers.__version__.startswith("4."):
        # transformers 5 strips only ".weight" from the last parameter's name ("classifier.bias" stays), so
        # bitsandbytes quantizes a last layer with a bias; transformers 4.57 and qpass leave it out
        expected.discard("classifier")
    if skip_modules == [] and theirs.config.get_text_config().tie_word_embeddings:
        expected.discard("lm_head")  # tied to the input embedding (T5, GPT-2): bitsandbytes quantizes it, and
        # its forward then fails an assertion; qpass never quantizes a tied output layer
    plan = qpass.QPassConfig.from_bitsandbytes(bnb_config)
    if case == "llama classifier from a causal LM" and skip_modules == []:
        # bitsandbytes quantizes the new head too, uninitialised (its forward then fails an assertion)
        with pytest.raises(ValueError, match=r"no weight for 'score'.*naming it in skip_modules"):
            auto.from_pretrained(tmp_path, quantization_config=plan, device_map="cpu", **options)
        return
    ours = auto.from_pretrained(tmp_path, quantization_config=plan, device_map="cpu", **options)
    assert {name for name, module in ours.named_modules() if isinstance(module, qpass.QuantizedLinear)} == expected
    torch.manual_seed(0)
    in_memory = qpass.quantize(auto.from_config(ours.config).eval(), bnb_config)
    assert {name for name, module in in_memory.named_modules() if isinstance(module, qpass.QuantizedLinear)} == expected
    left_out = {name for name, module in theirs.named_modules() if isinstance(module, torch.nn.Linear)} - expected
    assert expected and (left_out or skip_modules == [])
    ids = torch.randint(3, 128, (1, 6))
    inputs = {"input_ids": ids, "decoder_input_ids": ids} if case == "t5" else {"input_ids": ids}
    with torch.no_grad():
        assert torch.isfinite(ours(**inputs).logits).all()


def test_a_quantized_layer_the_checkpoint_lacks_is_refused_by_name(fp_checkpoint, mixed_checkpoint, tmp_path):
    """transformers initialises a missing weight at random; a QuantizedLinear would keep uninitialised
    memory (NaN logits), so the load fails naming the layer: a layer quantized while loading, and a layer
    of a qpass checkpoint (a new classifier head: above)."""
    from safetensors.torch import save_file

    shutil.copytree(fp_checkpoint, tmp_path / "fp")
    tensors = load_file(tmp_path / "fp" / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "fp" / "model.safetensors", metadata={"format": "pt"})
    missing = r"the checkpoint has no weight for 'model.layers.0.mlp.up_proj', which the quantization config quantizes"
    with pytest.raises(ValueError, match=missing):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qpass.QPassConfig("nf4"),
                                             device_map="cpu")
    if transformers.__version__.startswith("4."):
        return  # transformers 4 refuses qpass checkpoints
    shutil.copytree(mixed_checkpoint, tmp_path / "mixed")
    layer = "model.layers.0.mlp.up_proj."
    for file in (tmp_path / "mixed").glob("model-*.safetensors"):
        kept = {k: t for k, t in load_file(file).items() if not k.startswith(layer)}
        save_file(kept, file, metadata={"format": "pt"})
    index = json.loads((tmp_path / "mixed" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if not k.startswith(layer)}
    (tmp_path / "mixed" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=missing):
        AutoModelForCausalLM.from_pretrained(tmp_path / "mixed", device_map="cpu")
