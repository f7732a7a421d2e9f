"""Mixture-of-experts models whose experts are fused parameters (transformers 5): the plan says it leaves
them in full precision, and their checkpoints load and save as transformers loads and saves them."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import qpass
from qpass.checkpoints.errors import CheckpointError

from models import BNB_AGREEMENT, bitsandbytes_checkpoint, relative_error, same_bytes, tiny_llama, tiny_mixtral


class FusedExperts(nn.Module):
    """Two experts held as transformers 5 holds them: one ``[experts, out, in]`` parameter per projection."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 32, 16))
        self.down_proj = nn.Parameter(torch.randn(2, 16, 16))

    def forward(self, x):  # every token through both experts, summed
        hidden = torch.bmm(x.expand(2, -1, -1), self.gate_up_proj.transpose(1, 2))[..., :16].relu()
        return torch.bmm(hidden, self.down_proj.transpose(1, 2)).sum(0)


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.position = nn.Parameter(torch.randn(1, 4, 16))  # three dimensions, not an expert's
        self.proj = nn.Linear(16, 16)
        self.experts = FusedExperts()

    def forward(self, x):
        return self.experts(self.proj(x) + self.position[0, : x.shape[0]])


def _plan_warnings(quantize) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize()
    return [str(w.message) for w in caught if "mixture-of-experts" in str(w.message)]


def test_quantize_warns_of_fused_expert_weights_it_leaves_in_full_precision():
    """Both front-ends quantize the linear layers and warn, naming the fused expert weights and their share
    of the model's weights (here 1536 of 1872, 82%), which they leave as they are. A three-dimensional
    parameter outside an experts module is not one; a dense model gets no warning."""
    model = TinyMoE()
    expected = ("'experts.gate_up_proj', 'experts.down_proj': 82% of its weights), which qpass leaves in full "
                "precision")
    gate_up = model.experts.gate_up_proj
    exported = torch.export.export(model, (torch.randn(3, 16),))
    messages = _plan_warnings(lambda: qpass.quantize(model, "nf4"))
    assert len(messages) == 1 and expected in messages[0] and messages[0].startswith("qpass: TinyMoE holds")
    assert isinstance(model.proj, qpass.QuantizedLinear) and model.experts.gate_up_proj is gate_up
    messages = _plan_warnings(lambda: qpass.quantize(exported, "nf4"))
    assert len(messages) == 1 and expected in messages[0] and "this exported program" in messages[0]
    assert _plan_warnings(lambda: qpass.quantize(tiny_llama(), "nf4")) == []


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def mixtral_checkpoint(tmp_path_factory):
    model = tiny_mixtral()
    if not isinstance(getattr(model.model.layers[0].mlp.experts, "gate_up_proj", None), nn.Parameter):
        pytest.skip("this transformers holds Mixtral's experts as nn.Linear layers (transformers 4), which qpass "
                    "quantizes as any other")
    path = tmp_path_factory.mktemp("mixtral") / "fp"
    model.save_pretrained(path)
    # transformers 5 saves the fused experts as the original checkpoints hold them: a tensor per expert
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in load_file(path / "model.safetensors")
    return path


def test_mixtral_quantizes_while_loading_as_through_transformers(mixtral_checkpoint):
    """qpass.from_pretrained loads a checkpoint whose tensors transformers merges (one per expert into the
    fused experts) through transformers' loader with qpass' quantizer: the same model as
    AutoModelForCausalLM with a QPassConfig, attention quantized, experts in full precision and warned of."""
    messages = _plan_warnings(lambda: qpass.from_pretrained(mixtral_checkpoint, "nf4"))
    assert len(messages) == 1 and "qpass: MixtralForCausalLM holds" in messages[0]
    ours = qpass.from_pretrained(mixtral_checkpoint, "nf4")
    theirs = AutoModelForCausalLM.from_pretrained(mixtral_checkpoint, quantization_config=qpass.QPassConfig("nf4"),
                                                  device_map="cpu")
    assert isinstance(ours.model.layers[1].self_attn.o_proj, qpass.QuantizedLinear)
    assert torch.equal(_logits(ours), _logits(theirs))
    fp = AutoModelForCausalLM.from_pretrained(mixtral_checkpoint)
    assert torch.equal(ours.model.layers[0].mlp.experts.down_proj, fp.model.layers[0].mlp.experts.down_proj)
    assert 0 < relative_error(_logits(ours), _logits(fp)) < 0.2
    # qpass.footprint (and qpass inspect) counts them apart: 2 layers x 4 experts x 3 x 128 x 64 float32 weights
    footprint = qpass.footprint(ours)
    assert footprint.fused_expert_bytes == 2 * 4 * 3 * 128 * 64 * 4
    assert "fused mixture-of-experts weights, in full precision: 0.75 MiB" in str(footprint)
    assert qpass.footprint(qpass.quantize(tiny_llama(), "nf4")).fused_expert_bytes == 0


def test_loading_through_transformers_shows_its_progress_bar_only_when_asked(mixtral_checkpoint, capfd):
    """progress=False (the default; the command line's --quiet) keeps transformers' loading bar off too, and
    leaves transformers' own setting as it was."""
    from transformers.utils import logging as transformers_logging

    capfd.readouterr()
    qpass.from_pretrained(mixtral_checkpoint, "nf4")
    assert "Loading weights" not in capfd.readouterr().err and transformers_logging.is_progress_bar_enabled()
    qpass.from_pretrained(mixtral_checkpoint, "nf4", progress=True)
    assert "Loading weights" in capfd.readouterr().err


@pytest.mark.parametrize("plan", ["nf4", "nf4 + int8"])
def test_mixtral_checkpoint_saves_as_transformers_saves_and_loads_back(mixtral_checkpoint, tmp_path, plan):
    """qpass.save_pretrained writes the files model.save_pretrained writes (experts a tensor per expert,
    attention in bitsandbytes' layout); qpass.from_pretrained reads them back bit for bit, one format
    (a bitsandbytes checkpoint, which transformers + bitsandbytes reads too) or two (qpass' own)."""
    overrides = {"*.self_attn.v_proj": "int8"} if "int8" in plan else {}
    model = qpass.from_pretrained(mixtral_checkpoint, "nf4", overrides=overrides)
    qpass.save_pretrained(model, tmp_path / "qpass")
    model.save_pretrained(tmp_path / "transformers")
    ours, theirs = (load_file(tmp_path / name / "model.safetensors") for name in ("qpass", "transformers"))
    assert ours.keys() == theirs.keys() and all(same_bytes(ours[k], theirs[k]) for k in ours)
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in ours
    assert "model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in ours
    configs = [json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
               for name in ("qpass", "transformers")]
    assert configs[0] == configs[1] and configs[0]["quant_method"] == ("qpass" if overrides else "bitsandbytes")

    loaded = qpass.from_pretrained(tmp_path / "qpass")
    assert torch.equal(_logits(loaded), _logits(model))
    for key, value in model.state_dict().items():
        assert same_bytes(loaded.state_dict()[key], value), key
    if overrides:
        assert loaded.model.layers[1].self_attn.v_proj.layout.config.format_name == "int8"
        return
    bnb = AutoModelForCausalLM.from_pretrained(tmp_path / "qpass", device_map="cpu", dtype=torch.float32)
    assert type(bnb.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert relative_error(_logits(bnb), _logits(model)) <= 1e-6


def test_transformers_bitsandbytes_mixtral_checkpoint_loads_in_qpass(mixtral_checkpoint, tmp_path):
    """A Mixtral checkpoint transformers + bitsandbytes wrote (attention quantized, experts in full precision
    a tensor per expert) loads in qpass with bitsandbytes' bytes."""
    theirs = bitsandbytes_checkpoint(mixtral_checkpoint, tmp_path / "bnb", "nf4")
    ours = qpass.from_pretrained(tmp_path / "bnb")
    layer = ours.model.layers[1].self_attn.k_proj
    assert isinstance(layer, qpass.QuantizedLinear)
    assert same_bytes(layer.weight, theirs.model.layers[1].self_attn.k_proj.weight.data)
    assert relative_error(_logits(ours), _logits(theirs)) <= BNB_AGREEMENT["nf4"]


def test_quantized_per_expert_tensors_are_refused_by_name(mixtral_checkpoint, tmp_path):
    """A checkpoint with quantized tensors under the per-expert names (transformers 4 + bitsandbytes
    quantized each expert's nn.Linear) cannot become transformers 5's fused experts: refused, naming one."""
    qpass.save_pretrained(qpass.from_pretrained(mixtral_checkpoint, "nf4"), tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.0.w1.weight.absmax"
    tensors[key] = torch.ones(4)
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    refusal = f"quantized tensors of single experts \\('{key}'\\).*load it with transformers 4"
    with pytest.raises(CheckpointError, match=refusal):
        qpass.from_pretrained(tmp_path / "q")
