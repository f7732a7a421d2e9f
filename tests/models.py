"""Tiny transformers models built from configs (no downloads)."""

import torch
from transformers import (AutoModelForCausalLM, BertConfig, BertForSequenceClassification, BertLMHeadModel,
                          BitsAndBytesConfig, CLIPVisionConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, MixtralConfig,
                          MixtralForCausalLM, T5Config, T5ForConditionalGeneration)

from qpass.evaluation import relative_error  # noqa: F401  (the tests import it from here)


BNB_CONFIGS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}
# 4-bit layers give identical logits on CPU. int8: a bitsandbytes checkpoint loads with float16
# compute, as bitsandbytes runs it (3.5e-3 apart, summation order and rounding); a qpass int8 model
# computes in bf16 by default, which bitsandbytes replaces by float16 when it loads the file (8e-3).
BNB_AGREEMENT = {"nf4": 1e-6, "fp4": 1e-6, "int8": 1e-2}


def bitsandbytes_checkpoint(fp_checkpoint, out, fmt: str):
    """The model transformers + bitsandbytes loads from ``fp_checkpoint`` in ``fmt`` (``BNB_CONFIGS``),
    saved to ``out``. dtype=torch.float32 given: transformers 4 would otherwise put the layers bitsandbytes
    leaves alone in float16."""
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint, quantization_config=BNB_CONFIGS[fmt],
                                                 device_map="cpu", dtype=torch.float32)
    model.save_pretrained(out)
    return model


def tiny_llama(tie_word_embeddings=False, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_decoder() -> BertLMHeadModel:
    """A causal LM with integer buffers (``position_ids``, ``token_type_ids``), unlike Llama's."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, is_decoder=True)
    return BertLMHeadModel(config).eval()


def tiny_bert_classifier() -> BertForSequenceClassification:
    """A classifier whose last layer (``classifier``) has a bias."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_t5() -> T5ForConditionalGeneration:
    """An encoder-decoder with ``_keep_in_fp32_modules`` (its feed-forward outputs, ``wo``) and a tied lm_head."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4)
    return T5ForConditionalGeneration(config).eval()


def tiny_llava() -> LlavaForConditionalGeneration:
    """A vision-language model, whose checkpoints transformers 5 renames while loading
    (``language_model.model.layers...`` on disk, ``model.language_model.layers...`` in the model)."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_index=127)).eval()


def tiny_mixtral() -> MixtralForCausalLM:
    """A mixture-of-experts model: transformers 5 holds its experts fused (``mlp.experts.gate_up_proj``) and
    its checkpoints a tensor per expert (``block_sparse_moe.experts.0.w1.weight``)."""
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def bare_name(name: str) -> str:
    """A tensor's or module's name in the model PEFT wraps (``base_model.model.`` and LoRA's
    ``.base_layer`` taken out)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether two tensors hold the same bytes, whatever their dtypes and shapes: packed 4-bit weights in
    a float ``quant_storage`` may hold NaN patterns, which ``torch.equal`` on the values would reject."""
    return torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


# Under torch.compile, Inductor compiles the reference body of a qpass op on CPU and does not emulate
# the intermediate rounding to bf16 (torch._inductor.config.emulate_precision_casts is off by default),
# so compiled and eager differ by bf16 rounding: a few 1e-3 relative, far below quantization error.
COMPILE_VS_EAGER_BF16 = 1e-2

# A whole model with int8 layers run by ONNX Runtime against qpass: ONNX Runtime sums in another order
# (1e-7 relative), which can flip the rounding of an int8 activation and move the logits by about 1e-4
# (LLM.int8() does that to any 1e-7 change of its input). Measured on the tiny Llama with int8
# down_proj over 200 random shapes: 10% of them above 1e-6, the largest 1.7e-4. The int8 lowering
# itself is checked bit for bit, op by op, in tests/test_onnx_export.py.
ONNX_INT8_MODEL = 1e-3
