"""Checkpoints of many transformers architectures, tiny and random, through qpass.from_pretrained: the model
transformers gives with a QPassConfig, and a qpass checkpoint that loads back bit for bit. A regression net
for new transformers releases (CI installs the newest), which change checkpoint names and layouts."""

import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

import qpass

from models import same_bytes

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
# model type -> (config fields besides SIZES, whether it has fused mixture-of-experts weights)
ARCHITECTURES = {
    "llama": ({}, False),
    "qwen3": ({"head_dim": 16}, False),
    "gemma2": ({"head_dim": 16}, False),
    "phi3": ({"pad_token_id": 0}, False),
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}, False),
    "gpt_neox": ({}, False),
    "opt": ({"ffn_dim": 128, "word_embed_proj_dim": 64}, False),
    "bloom": ({"n_layer": 2, "n_head": 4}, False),
    "falcon": ({}, False),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, True),
    "qwen2_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                   "shared_expert_intermediate_size": 64}, True),
    "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2}, True),
    "deepseek_v3": ({"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                     "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 64, "qk_rope_head_dim": 8,
                     "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8, "n_group": 1, "topk_group": 1}, True),
    "gpt_oss": ({"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16}, True),
}
IDS = torch.randint(0, 120, (1, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _quiet_transformers():
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # load reports of tied or unused tensors
    yield
    transformers_logging.set_verbosity(verbosity)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_architecture_loads_as_through_transformers_and_round_trips(model_type, fmt, tmp_path):
    fields, fused_experts = ARCHITECTURES[model_type]
    try:
        config = AutoConfig.for_model(model_type, **SIZES, **fields)
    except ValueError as err:  # an older transformers (4.57) without this architecture
        pytest.skip(f"transformers has no {model_type}: {err}")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "fp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = qpass.from_pretrained(tmp_path / "fp", fmt)
    experts_warned = any("mixture-of-experts" in str(w.message) for w in caught)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qpass.QPassConfig(fmt),
                                                  device_map="cpu")
    assert qpass.footprint(ours).layers and torch.equal(_logits(ours), _logits(theirs))
    # transformers 5 fuses the experts (left in full precision, warned of); transformers 4 holds nn.Linear ones
    fused_here = fused_experts and int(transformers.__version__.split(".")[0]) >= 5
    assert experts_warned == fused_here and (qpass.footprint(ours).fused_expert_bytes > 0) == fused_here

    qpass.save_pretrained(ours, tmp_path / "q")
    loaded = qpass.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(loaded), _logits(ours))
    for key, value in ours.state_dict().items():
        assert same_bytes(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_architecture_quantizes_the_same_through_export(model_type):
    """The graph front-end quantizes the layers the module front-end quantizes, to the same logits: a
    mixture-of-experts router, an F.linear the exported graph shows, stays in full precision in both."""
    from qpass.passes.program_edit import quantized_linear_nodes

    fields, _ = ARCHITECTURES[model_type]
    try:
        config = AutoConfig.for_model(model_type, **SIZES, **fields)
    except ValueError as err:
        pytest.skip(f"transformers has no {model_type}: {err}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    try:
        exported = torch.export.export(model, (IDS,), {"use_cache": False})
    except RuntimeError as err:  # torch.export itself, before qpass
        pytest.skip(f"torch.export cannot export this tiny {model_type}: {str(err)[:120]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fused experts, warned of in the test above
        program = qpass.quantize(exported, "nf4")
        module = qpass.quantize(model, "nf4")
    layers = {q.layer for q in quantized_linear_nodes(program, program.graph)}
    assert layers == {layer.name for layer in qpass.footprint(module).layers}
    assert torch.equal(program.module()(IDS, use_cache=False).logits, _logits(module))
