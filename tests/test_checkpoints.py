"""Checkpoints: bit-exact round trips, both directions with transformers + bitsandbytes, atomic writes,
clear errors, and quantize-while-loading memory."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import qpass

from models import (BNB_AGREEMENT, BNB_CONFIGS, bitsandbytes_checkpoint, relative_error, same_bytes, tiny_llama,
                    tiny_llava)

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
QPASS_SPECS = {"nf4": "nf4", "fp4": qpass.FP4Config(double_quant=False), "int8": "int8"}
# transformers loads with bitsandbytes with dtype=torch.float32 given: transformers 4 would otherwise
# put the layers bitsandbytes leaves alone in float16.


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "llama"
    tiny_llama().save_pretrained(path)
    return path


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_round_trip_is_bit_exact(fmt, tmp_path):
    model = qpass.quantize(tiny_llama(), QPASS_SPECS[fmt])
    qpass.save_pretrained(model, tmp_path / "q")
    loaded = qpass.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(loaded), _logits(model))
    for key, value in model.state_dict().items():
        assert same_bytes(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_qpass_checkpoint_loads_in_transformers_bitsandbytes(fmt, tmp_path):
    model = qpass.quantize(tiny_llama(), QPASS_SPECS[fmt])
    qpass.save_pretrained(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu", dtype=torch.float32)
    layer = theirs.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == ("Linear8bitLt" if fmt == "int8" else "Linear4bit")
    ours = model.model.layers[0].mlp.up_proj
    assert same_bytes(layer.weight.data, ours.weight)
    assert relative_error(_logits(theirs), _logits(model)) <= BNB_AGREEMENT[fmt]


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_transformers_bitsandbytes_checkpoint_loads_in_qpass(fmt, fp_checkpoint, tmp_path):
    theirs = bitsandbytes_checkpoint(fp_checkpoint, tmp_path / "bnb", fmt)
    ours = qpass.from_pretrained(tmp_path / "bnb")
    layer = ours.model.layers[1].self_attn.o_proj
    assert isinstance(layer, qpass.QuantizedLinear)
    assert same_bytes(layer.weight, theirs.model.layers[1].self_attn.o_proj.weight.data)
    assert relative_error(_logits(ours), _logits(theirs)) <= BNB_AGREEMENT[fmt]
    # and qpass writes it back byte for byte
    qpass.save_pretrained(ours, tmp_path / "again")
    before = load_file(tmp_path / "bnb" / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert same_bytes(before[key], after[key]), key


BNB_ONLY_CONFIGS = {  # bitsandbytes' defaults (FP4, no double quant, float32 compute), and skip modules
    "defaults": BitsAndBytesConfig(load_in_4bit=True),
    "skipping": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16,
                                   llm_int8_skip_modules=["lm_head", "down_proj"]),
    "int8-threshold": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.5),
}


@pytest.mark.parametrize("name", [*BNB_CONFIGS, *BNB_ONLY_CONFIGS])
def test_a_bitsandbytes_config_quantizes_as_bitsandbytes_does(name, fp_checkpoint, tmp_path):
    """transformers' BitsAndBytesConfig given to qpass: the same layers quantized, to the same bytes, as
    transformers + bitsandbytes gives with it, and the same arithmetic (int8: float16 compute)."""
    bnb_config = {**BNB_CONFIGS, **BNB_ONLY_CONFIGS}[name]
    theirs = AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=bnb_config, device_map="cpu",
                                                  dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "bnb")
    ours = qpass.from_pretrained(fp_checkpoint, bnb_config)
    qpass.save_pretrained(ours, tmp_path / "qpass")
    expected = load_file(tmp_path / "bnb" / "model.safetensors")
    actual = load_file(tmp_path / "qpass" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert same_bytes(expected[key], actual[key]), key
    assert relative_error(_logits(ours), _logits(theirs)) <= BNB_AGREEMENT["int8" if bnb_config.load_in_8bit else "nf4"]
    in_memory = qpass.quantize(tiny_llama(), bnb_config)  # the same plan for a model in memory
    assert torch.equal(_logits(in_memory), _logits(ours))
    if bnb_config.load_in_8bit:
        assert ours.model.layers[0].mlp.up_proj.layout.config.compute_dtype == torch.float16


def test_bitsandbytes_options_qpass_cannot_honour_are_refused():
    with pytest.raises(ValueError, match=r"llm_int8_has_fp16_weight=True\) keeps int8 weights in fp16 to train them"):
        qpass.QPassConfig.from_bitsandbytes(BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True))
    with pytest.raises(ValueError, match=r"sets exactly one of load_in_4bit and load_in_8bit"):
        qpass.QPassConfig.from_bitsandbytes({"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type='int4' is not one bitsandbytes knows"):
        qpass.QPassConfig.from_bitsandbytes({"quant_method": "bitsandbytes", "load_in_4bit": True,
                                             "bnb_4bit_quant_type": "int4"})
    with pytest.raises(ValueError, match=r"expected a transformers BitsAndBytesConfig"):
        qpass.QPassConfig.from_bitsandbytes(qpass.QPassConfig("nf4"))
    with pytest.raises(TypeError, match=r"a BitsAndBytesConfig is a whole plan .* QPassConfig.from_bitsandbytes"):
        qpass.QPassConfig("nf4", overrides={"*.mlp.*": BNB_CONFIGS["int8"]})


@pytest.mark.parametrize("key", ["model.norm.weight", "model.layers.1.mlp.up_proj.weight"])
def test_a_tensor_missing_from_the_checkpoint_is_refused_with_what_to_do(fp_checkpoint, tmp_path, key):
    """qpass.from_pretrained loads only what is stored (a layer it quantizes, or one it does not), and
    says where new layers can start at random instead."""
    shutil.copytree(fp_checkpoint, tmp_path / "fp")
    tensors = load_file(tmp_path / "fp" / "model.safetensors")
    del tensors[key]
    save_file(tensors, tmp_path / "fp" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qpass.CheckpointError, match=rf"tensor '{key}' is missing from the checkpoint\. "
                                                    r".*load through transformers"):
        qpass.from_pretrained(tmp_path / "fp", "nf4")


def test_a_checkpoint_of_another_class_is_refused_with_what_to_do(fp_checkpoint):
    """A causal LM's checkpoint into a classifier: its lm_head does not belong there, and qpass.from_pretrained
    says to load through transformers, which drops it and starts the new head."""
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(qpass.CheckpointError, match=r"tensor 'lm_head.weight' does not belong to this "
                                                    r"LlamaForSequenceClassification\. .*load through transformers"):
        qpass.from_pretrained(fp_checkpoint, "nf4", model_class=AutoModelForSequenceClassification)


def test_tensors_transformers_drops_by_design_are_dropped(fp_checkpoint, tmp_path, monkeypatch):
    """A rotary table older Llama checkpoints stored (``rotary_emb.inv_freq``, which the model computes) and
    a tensor the class lists in ``_keys_to_ignore_on_load_unexpected`` load as transformers loads them:
    dropped. Any other tensor the model has no place for is still refused."""
    from transformers import LlamaForCausalLM

    shutil.copytree(fp_checkpoint, tmp_path / "fp")
    tensors = load_file(tmp_path / "fp" / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["model.layers.0.extra_state"] = torch.ones(2)
    save_file(tensors, tmp_path / "fp" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qpass.CheckpointError, match=r"tensor 'model.layers.0.extra_state' does not belong"):
        qpass.from_pretrained(tmp_path / "fp", "nf4")
    monkeypatch.setattr(LlamaForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"\.extra_state$"])
    loaded = qpass.from_pretrained(tmp_path / "fp", "nf4")
    assert torch.equal(_logits(loaded), _logits(qpass.from_pretrained(fp_checkpoint, "nf4")))


def test_quantize_while_loading_equals_quantizing_after(fp_checkpoint):
    overrides = {"*.self_attn.*": "int8", "*.self_atn.*": "fp4"}  # the second, mistyped, is warned of
    with pytest.warns(UserWarning, match=r"override '\*\.self_atn\.\*' matches no linear layer of LlamaForCausalLM"):
        loaded = qpass.from_pretrained(fp_checkpoint, "nf4", overrides=overrides)
    with pytest.warns(UserWarning, match="self_atn"):
        after = qpass.quantize(tiny_llama(), "nf4", overrides=overrides)
    assert torch.equal(_logits(loaded), _logits(after))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loading onto a GPU needs a CUDA device")
def test_loading_onto_cuda_reads_and_quantizes_there(fp_checkpoint, tmp_path):
    """device="cuda": stored layers and layers quantized while loading land on the GPU, and equal what
    the same steps give on that device from a model in memory."""
    plan = {"spec": "nf4", "overrides": {"*.self_attn.*": "int8"}}
    ids = IDS.to("cuda")
    loaded = qpass.from_pretrained(fp_checkpoint, plan["spec"], overrides=plan["overrides"], device="cuda")
    assert {t.device for t in loaded.state_dict().values()} == {torch.device("cuda", torch.cuda.current_device())}
    expected = qpass.quantize(tiny_llama().to("cuda"), plan["spec"], overrides=plan["overrides"])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
        qpass.save_pretrained(expected, tmp_path / "q")
        stored = qpass.from_pretrained(tmp_path / "q", device="cuda")
        assert {t.device.type for t in stored.state_dict().values()} == {"cuda"}
        assert torch.equal(stored(ids).logits, expected(ids).logits)


def test_tied_output_layer_stays_tied_when_quantizing_while_loading(tmp_path):
    from safetensors.torch import save_file as write

    model = tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")
    tensors = load_file(tmp_path / "tied" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # some checkpoints store both
    write(tensors, tmp_path / "tied" / "model.safetensors", metadata={"format": "pt"})
    loaded = qpass.from_pretrained(tmp_path / "tied", "nf4", skip_modules=[])
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    expected = qpass.quantize(tiny_llama(tie_word_embeddings=True), "nf4", skip_modules=[])
    assert torch.equal(_logits(loaded), _logits(expected))


def test_mixed_formats_save_as_qpass_config(tmp_path):
    model = qpass.quantize(tiny_llama(), "nf4", overrides={"*.self_attn.*": "int8"})
    qpass.save_pretrained(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qpass"
    assert config["layers"]["model.layers.0.self_attn.q_proj"]["format"] == "int8"
    assert torch.equal(_logits(qpass.from_pretrained(tmp_path / "q")), _logits(model))


def test_sharded_checkpoint(tmp_path):
    model = qpass.quantize(tiny_llama(), "nf4")
    qpass.save_pretrained(model, tmp_path / "q", max_shard_size="20KB")
    assert (tmp_path / "q" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "q").glob("model-*.safetensors"))) > 1
    assert torch.equal(_logits(qpass.from_pretrained(tmp_path / "q")), _logits(model))


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model = qpass.quantize(tiny_llama(), "nf4")
    qpass.save_pretrained(model, tmp_path / "q")

    def crash(folder, tensors, max_shard_size):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt  # e.g. the user's Ctrl-C half way

    monkeypatch.setattr("qpass.checkpoints.save.write_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        qpass.save_pretrained(qpass.quantize(tiny_llama(), "int8"), tmp_path / "q")
    with pytest.raises(KeyboardInterrupt):
        qpass.save_pretrained(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no staging folder left behind
    assert torch.equal(_logits(qpass.from_pretrained(tmp_path / "q")), _logits(model))


def _saved(tmp_path):
    qpass.save_pretrained(qpass.quantize(tiny_llama(), "nf4"), tmp_path / "q")
    return tmp_path / "q"


def test_truncated_file_names_the_file(tmp_path):
    path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(qpass.CheckpointError, match=r"model.safetensors: cannot read it .*truncated or corrupted"):
        qpass.from_pretrained(path)


def test_missing_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight.absmax"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(qpass.CheckpointError, match=r"tensor 'model.layers.1.mlp.down_proj.weight.absmax' is missing"):
        qpass.from_pretrained(path)
    path = _saved(tmp_path / "fresh")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(qpass.CheckpointError, match=r"tensor 'model.norm.weight' is missing"):
        qpass.from_pretrained(path)


def test_shape_mismatch_is_named(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    absmax = "model.layers.0.mlp.up_proj.weight.absmax"
    tensors[absmax] = tensors[absmax][:-1].clone()
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(qpass.CheckpointError, match=rf"{absmax}: shape \(127,\) does not match"):
        qpass.from_pretrained(path)


def test_dtype_mismatch_is_named_at_load(tmp_path):
    """A stored absmax of the wrong dtype is refused by the loader, not left for the layer to refuse."""
    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    absmax = "model.layers.0.mlp.up_proj.weight.absmax"
    tensors[absmax] = tensors[absmax].to(torch.float16)  # uint8 codes with double quantization
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(qpass.CheckpointError, match=rf"{absmax}: dtype torch.float16, where a nf4 weight with "
                                                    r"double quantization stores torch.uint8"):
        qpass.from_pretrained(path)


def test_pickle_is_never_loaded(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(qpass.CheckpointError, match=r"qpass reads safetensors only and never unpickles"):
        qpass.from_pretrained(tmp_path)


def test_errors_for_bad_arguments(tmp_path, fp_checkpoint):
    with pytest.raises(qpass.CheckpointError, match=r"no such checkpoint folder"):
        qpass.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(qpass.CheckpointError, match=r"already quantized \(bitsandbytes\); load it without a format"):
        qpass.from_pretrained(_saved(tmp_path), "int8")
    with pytest.raises(qpass.CheckpointError, match=r"has no qpass-quantized layer"):
        qpass.save_pretrained(tiny_llama(), tmp_path / "x")
    with pytest.raises(qpass.CheckpointError, match=r"needs a transformers model"):
        qpass.save_pretrained(qpass.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), "nf4"), tmp_path / "y")


MEASURE = textwrap.dedent("""
    import sys, threading, time, qpass

    def anonymous_rss():  # resident memory the process owns (not file pages mapped from safetensors)
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    def load(path):
        if sys.argv[3] == "qpass":
            return qpass.from_pretrained(path, sys.argv[2])
        from transformers import AutoModelForCausalLM  # through transformers' quantizer registration
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=qpass.QPassConfig(sys.argv[2]),
                                                    device_map="cpu")

    load(sys.argv[4])  # a tiny model of the same kind first: the modules loading imports are not the load's
    peak, done = [anonymous_rss()], []
    def sample():
        while not done:
            peak.append(max(peak[-1], anonymous_rss()))
            time.sleep(0.002)
    base = anonymous_rss()
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        model = load(sys.argv[1])
    finally:  # a failure ends the process (and fails the test) rather than leaving the sampler running
        done.append(True)
        thread.join()
    print(max(peak) - base)
""")


def test_quantize_while_loading_peak_memory(tmp_path):
    """Peak anonymous memory while quantizing a 321 MiB float32 checkpoint to nf4 as it loads stays
    near the quantized size plus a few times the largest tensor (the reference quantizer's float32 and
    int32 temporaries for one tensor), far below the full-precision model. Sampled from
    /proc/self/status every 2 ms in a fresh process, after loading a tiny model the same way (so the
    modules loading imports are not counted: they were 50-60 MiB, and grew with Python 3.12). Measured
    78-87 MiB on the development machine (Python 3.11 and 3.12, torch 2.11 and 2.13, transformers 4.57.6,
    5.23 and 5.24; 2026-11-24)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=5,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "big")
    tiny = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    LlamaForCausalLM(tiny).save_pretrained(tmp_path / "tiny")
    fp32_bytes = (tmp_path / "big" / "model.safetensors").stat().st_size
    largest = 4 * 1024 * 4096
    # A fixed mmap threshold makes glibc return each freed tensor to the system at once; with its
    # default dynamic threshold freed 16 MiB temporaries stay in the heap and RSS counts them as used.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    quantized_bytes = fp32_bytes * 4.127 / 32
    for route in ("qpass", "transformers"):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big"), "nf4", route,
                              str(tmp_path / "tiny")], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        peak = int(out.stdout.strip().splitlines()[-1])
        print(f"checkpoint {fp32_bytes / 2**20:.0f} MiB (fp32), quantized {quantized_bytes / 2**20:.0f} MiB, largest "
              f"tensor {largest / 2**20:.0f} MiB; peak anonymous memory growth quantizing while loading ({route}): "
              f"{peak / 2**20:.0f} MiB")
        assert peak < quantized_bytes + 4 * largest, route
        assert peak < 0.5 * fp32_bytes, route


def test_a_checkpoint_transformers_renames_quantizes_saves_and_loads_as_through_transformers(tmp_path):
    """A vision-language checkpoint holds its tensors under the names transformers 5 renames while loading
    (``language_model.model.layers...``). qpass.from_pretrained quantizes it while loading as transformers
    with a QPassConfig does, qpass.save_pretrained writes the checkpoint's own names back (as
    model.save_pretrained does), and both qpass and transformers + bitsandbytes load that."""
    from transformers import AutoModelForImageTextToText

    from qpass.checkpoints.bnb_layout import STORED_SUFFIXES

    tiny_llava().save_pretrained(tmp_path / "fp")
    stored = load_file(tmp_path / "fp" / "model.safetensors")
    ids = IDS.clamp(max=126)  # no image tokens

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    ours = qpass.from_pretrained(tmp_path / "fp", "nf4", model_class=AutoModelForImageTextToText)
    theirs = AutoModelForImageTextToText.from_pretrained(tmp_path / "fp", quantization_config=qpass.QPassConfig("nf4"),
                                                         device_map="cpu")
    assert isinstance(ours.model.language_model.layers[1].mlp.up_proj, qpass.QuantizedLinear)
    assert torch.equal(logits(ours), logits(theirs))
    qpass.save_pretrained(ours, tmp_path / "q")
    saved = load_file(tmp_path / "q" / "model.safetensors")
    assert "language_model.model.layers.1.mlp.up_proj.weight.absmax" in saved
    # the same names as the full-precision checkpoint, plus the quantized layers' extra tensors
    assert {k for k in saved if not k.endswith(STORED_SUFFIXES[:-1])} == stored.keys()

    loaded = qpass.from_pretrained(tmp_path / "q", model_class=AutoModelForImageTextToText)
    assert torch.equal(logits(loaded), logits(ours))
    bnb = AutoModelForImageTextToText.from_pretrained(tmp_path / "q", device_map="cpu", dtype=torch.float32)
    assert type(bnb.model.language_model.layers[1].mlp.up_proj).__name__ == "Linear4bit"
    assert relative_error(logits(bnb), logits(ours)) <= BNB_AGREEMENT["nf4"]
