"""The qpass command line and qpass.estimate."""

import errno
import re
import sys

import pytest
import torch

import qpass
from qpass import cli

from models import ONNX_INT8_MODEL, relative_error, tiny_bert_decoder, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "llama"
    tiny_llama().save_pretrained(path)
    return path


def test_quantize_inspect_estimate(fp_checkpoint, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", str(fp_checkpoint), "--format", "nf4", "--override", "*.self_attn.*=int8", "--out", str(out),
            "-q"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "14 layers quantized" in printed and f"wrote {out}" in printed
    footprint = qpass.footprint(qpass.from_pretrained(out))
    assert (f"model {footprint.total_bytes / 2**20:.1f} MiB, against {footprint.fp16_bytes / 2**20:.1f} MiB in fp16 "
            f"and {footprint.fp32_bytes / 2**20:.1f} MiB in fp32") in printed
    assert isinstance(qpass.from_pretrained(out).model.layers[0].self_attn.q_proj, qpass.QuantizedLinear)
    assert cli.main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in table and "int8" in table and "against" in table
    assert cli.main(["estimate", str(fp_checkpoint), "-f", "nf4"]) == 0
    assert "MiB quantized (14 layers)" in capsys.readouterr().out


def test_format_fields(fp_checkpoint, tmp_path, capsys):
    """FORMAT takes config fields after a colon, in --format and in --override, with bitsandbytes' meaning."""
    out = tmp_path / "q"
    fmt = "NF4:blocksize=128, double_quant=false,compute_dtype=float16"
    assert cli.main(["quantize", str(fp_checkpoint), "-f", fmt,
                     "--override", "*.self_attn.*=int8:threshold=4.5", "--override", "*.down_proj=none",
                     "-o", str(out), "-q"]) == 0
    layers = qpass.from_pretrained(out).model.layers[1]
    assert layers.mlp.up_proj.layout.config == qpass.NF4Config(blocksize=128, double_quant=False,
                                                                compute_dtype=torch.float16)
    assert layers.self_attn.k_proj.layout.config == qpass.Int8Config(threshold=4.5)
    assert isinstance(layers.mlp.down_proj, torch.nn.Linear)
    capsys.readouterr()
    assert cli.main(["estimate", str(fp_checkpoint), "-f", "fp4:blocksize=4096,double_quant=false"]) == 0
    expected = qpass.estimate(fp_checkpoint, qpass.FP4Config(blocksize=4096, double_quant=False))
    assert capsys.readouterr().out == f"{expected}\n"
    assert expected.total_bytes != qpass.estimate(fp_checkpoint, "fp4").total_bytes


def test_eval_on_a_text_file(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a word-level tokenizer over the tiny model's 128-token vocabulary, saved beside the checkpoint
    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = qpass.quantize(tiny_llama(), "nf4")
    qpass.save_pretrained(model, tmp_path / "q")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path / "q")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 127}" for i in range(300)))
    assert cli.main(["eval", str(tmp_path / "q"), "--text", str(text), "--window", "64", "--windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "/no/such/dir", "-f", "nf4", "-o", "x"], r"/no/such/dir: no such checkpoint folder"),
        (["inspect", "/no/such/dir"], r"/no/such/dir: no such checkpoint folder"),
        (["quantize", "{fp}", "-f", "nf5", "-o", "{tmp}/o"], r"unknown quantization format 'nf5'"),
        (["quantize", "{fp}", "-f", "nf4", "--override", "oops", "-o", "{tmp}/o"],
         r"--override 'oops': expected PATTERN=FORMAT"),
        (["quantize", "{fp}", "-f", "nf4:blocksize=100", "-o", "{tmp}/o"],
         r"--format 'nf4:blocksize=100': NF4Config: blocksize=100 is not supported; use a power of two"),
        (["quantize", "{fp}", "-f", "nf4:double_quant=maybe", "-o", "{tmp}/o"],
         r"--format 'nf4:double_quant=maybe': double_quant='maybe': expected true or false"),
        (["quantize", "{fp}", "-f", "int8:threshold=high", "-o", "{tmp}/o"], r"threshold='high': expected a number"),
        (["quantize", "{fp}", "-f", "nf4:group_size=64", "-o", "{tmp}/o"], r"NF4Config has no field 'group_size'"),
        (["quantize", "{fp}", "-f", "nf4:compute_dtype=float64", "-o", "{tmp}/o"],
         r"compute_dtype=torch.float64 is not supported; use one of bfloat16, float16, float32"),
        (["quantize", "{fp}", "-f", "nf4:blocksize", "-o", "{tmp}/o"], r"expected FIELD=VALUE after the colon"),
        (["quantize", "{fp}", "-f", "none", "-o", "{tmp}/o"], r"--format 'none' quantizes nothing"),
        (["estimate", "{fp}", "-f", "nf4", "--override", "*.mlp.*=fp4:blocksize=7"],
         r"--override 'fp4:blocksize=7': FP4Config: blocksize=7 is not supported"),
        (["eval", "{fp}", "--text", "/no/such.txt"], r"/no/such.txt: no such text file"),
        (["export-onnx", "{fp}", "-o", "{tmp}/o"], r"not a quantized checkpoint .* give --format to quantize it"),
        (["export-onnx", "{fp}", "--skip", "-o", "{tmp}/o"], r"--override and --skip .* give --format too"),
        (["export-onnx", "{fp}", "-f", "nf4", "-o", "{fp}/config.json"], r"config.json: exists and is not a folder"),
        (["quantize", "{fp}", "-f", "nf4", "--device", "gpu9", "-o", "{tmp}/o"], r"device='gpu9' is not a device"),
        pytest.param(["quantize", "{fp}", "-f", "nf4", "--device", "cuda", "-o", "{tmp}/o"],
                     r"device='cuda', but torch sees no CUDA device here; load onto the CPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
    ],
)
def test_errors_are_one_clear_line(argv, message, fp_checkpoint, tmp_path, capsys):
    argv = [a.format(fp=fp_checkpoint, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qpass {argv[0]}: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def _onnx_runtime_logits(path, ids):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    return torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])


def test_export_onnx_quantizing_while_loading(fp_checkpoint, tmp_path, capsys):
    argv = ["export-onnx", str(fp_checkpoint), "-f", "nf4", "--override", "*.mlp.down_proj=int8", "-o", str(tmp_path)]
    assert cli.main([*argv, "-q"]) == 0
    assert "logits float32; 12 4-bit layers (com.microsoft.MatMulBnb4), 2 int8 layers" in capsys.readouterr().out
    plan = qpass.QPassConfig(qpass.NF4Config(compute_dtype=torch.float32),
                             overrides={"*.mlp.down_proj": qpass.Int8Config(compute_dtype=torch.float32)})
    model = qpass.from_pretrained(fp_checkpoint, plan)
    generator = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (3, 17), (2, 40)]:  # any batch and sequence length
        ids = torch.randint(0, 128, shape, generator=generator)
        with torch.no_grad():
            want = model(ids).logits
        assert relative_error(_onnx_runtime_logits(tmp_path / "model.onnx", ids), want) < ONNX_INT8_MODEL


def test_export_onnx_of_a_bf16_checkpoint_runs_in_float32(tmp_path, capsys):
    """A bf16 checkpoint computing in bf16: ONNX Runtime's CPU provider has no bf16 MatMulBnb4, so the
    default --dtype float32 casts the full-precision tensors and sets the layers' compute dtype."""
    qpass.save_pretrained(qpass.quantize(tiny_llama(dtype=torch.bfloat16), "fp4"), tmp_path / "q")
    assert cli.main(["export-onnx", str(tmp_path / "q"), "-o", str(tmp_path / "onnx"), "-q"]) == 0
    model = qpass.set_compute_dtype(qpass.from_pretrained(tmp_path / "q", dtype=torch.float32), torch.float32)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
    assert want.dtype == torch.float32
    assert relative_error(_onnx_runtime_logits(tmp_path / "onnx" / "model.onnx", ids), want) < 1e-6


def test_export_onnx_with_past_generates_as_transformers_does(tmp_path, capsys):
    """--with-past on a bf16 checkpoint (exported in float32): ONNX Runtime's greedy generation from
    left-padded prompts gives transformers' generate tokens of the same model in float32."""
    import onnxruntime
    from transformers import AutoConfig

    from qpass.integrations.onnx_causal_lm import generate_greedy

    qpass.save_pretrained(qpass.quantize(tiny_llama(dtype=torch.bfloat16), "nf4"), tmp_path / "q")
    assert cli.main(["export-onnx", str(tmp_path / "q"), "--with-past", "-o", str(tmp_path / "onnx"), "-q"]) == 0
    assert "past_key_values.* -> logits, present.* float32; 14 4-bit layers" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    model = qpass.set_compute_dtype(qpass.from_pretrained(tmp_path / "q", dtype=torch.float32), torch.float32)
    prompts = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model.generate(prompts, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generate_greedy(session, prompts.numpy(), mask.numpy(), max_new_tokens=8).tolist() == want.tolist()
    # the configs Optimum's ORTModelForCausalLM reads, saying what the graph computes in
    config = AutoConfig.from_pretrained(tmp_path / "onnx")
    assert config.model_type == "llama" and config.quantization_config["bnb_4bit_compute_dtype"] == "float32"
    assert (tmp_path / "onnx" / "generation_config.json").is_file()


def test_export_onnx_without_onnxscript_says_what_to_install(fp_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    for name in ("qpass.integrations.onnx", "qpass.integrations.onnx_causal_lm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert cli.main(["export-onnx", str(fp_checkpoint), "-f", "nf4", "-o", str(tmp_path), "-q"]) == 2
    assert "qpass export-onnx: error: qpass' ONNX export needs onnxscript and onnx: pip install 'qpass[onnx]'" in (
        capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "qpass inspect: error:" in capsys.readouterr().err


def test_full_disk(fp_checkpoint, tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("qpass.checkpoints.save.write_tensors", no_space)
    assert cli.main(["quantize", str(fp_checkpoint), "-f", "nf4", "-o", str(tmp_path / "q"), "-q"]) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_help_for_every_command(capsys):
    for command in ("quantize", "inspect", "eval", "estimate", "export-onnx", "bench"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert "usage: qpass " + command in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["nf4", "fp4", "int8", qpass.NF4Config(double_quant=False, blocksize=128),
                                  qpass.QPassConfig("nf4", overrides={"*.self_attn.*": "int8"}, skip_modules=[])])
@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(tie_word_embeddings=True), tiny_gpt2,
                                  tiny_bert_decoder])
def test_estimate_is_exact(spec, make):
    model = make().to(torch.float16)
    estimate = qpass.estimate(model.config, spec)
    footprint = qpass.footprint(qpass.quantize(model, spec))
    assert estimate.total_bytes == footprint.total_bytes
    assert estimate.fp16_bytes == footprint.fp16_bytes and estimate.fp32_bytes == footprint.fp32_bytes
    assert sorted(estimate.layers) == sorted(layer.name for layer in footprint.layers)


def test_estimate_builds_the_model_class_given():
    """A classifier: estimate with model_class counts what quantizing that class gives (its score head
    left in full precision), not the causal LM's lm_head."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_llama().config
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config).to(torch.float16)
    estimate = qpass.estimate(config, "nf4", model_class=AutoModelForSequenceClassification)
    footprint = qpass.footprint(qpass.quantize(model, "nf4"))
    assert estimate.total_bytes == footprint.total_bytes and "score" not in estimate.layers
    assert estimate.total_bytes != qpass.estimate(config, "nf4").total_bytes
