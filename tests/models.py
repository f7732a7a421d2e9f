"""Tiny transformers models built from configs (no downloads)."""

import torch
from transformers import (BertConfig, BertForSequenceClassification, BertLMHeadModel, CLIPVisionConfig, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                          T5Config, T5ForConditionalGeneration)

from qpass.evaluation import relative_error  # noqa: F401  (the tests import it from here)


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
