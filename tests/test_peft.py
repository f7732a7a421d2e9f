"""QLoRA with PEFT on qpass models (qpass.integrations.peft)."""

import warnings

import pytest
import torch
import peft
from peft import LoraConfig, PeftModel

import qpass
from qpass.formats import quantize_weight
from qpass.integrations import peft as qpass_peft

from models import COMPILE_VS_EAGER_BF16, bare_name, relative_error, same_bytes, tiny_gpt2, tiny_llama

LLAMA_LINEARS = {f"model.layers.{i}.{name}" for i in range(2) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def _randomize_lora_b(model, seed=0):
    """PEFT starts B at zero (the adapter adds nothing); a random B makes the adapter visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _quantized_tensors(model):
    """The quantized tensors by the names the bare model gives them (PEFT wraps each layer)."""
    return {f"{bare_name(name)}.{t_name}": t.clone()
            for name, m in model.named_modules() if isinstance(m, qpass.QuantizedLinear)
            for t_name, t in m.quantized_tensors.items() if t is not None}


def test_qlora_sequence_classification_trains_the_new_head_in_full_precision(tmp_path):
    """The QLoRA classifier recipe: a causal LM's checkpoint loaded as AutoModelForSequenceClassification
    with a QPassConfig. Its new 'score' head is left in full precision (as bitsandbytes leaves it), so
    PEFT's SEQ_CLS task trains it as a module to save beside the adapters, and both reload."""
    from transformers import AutoModelForSequenceClassification

    tiny_llama().save_pretrained(tmp_path / "lm")

    def load():
        model = AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "lm", num_labels=3, quantization_config=qpass.QPassConfig("nf4"), device_map="cpu")
        model.config.pad_token_id = 0
        return model

    model = qpass_peft.get_peft_model(qpass_peft.prepare_model_for_kbit_training(load()),
                                      LoraConfig(r=4, task_type="SEQ_CLS", target_modules="all-linear"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".score.modules_to_save." in name for name in trainable)
    assert len([m for m in model.modules() if isinstance(m, qpass_peft.QuantizedLoraLinear)]) == len(LLAMA_LINEARS)
    ids, labels = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.save_pretrained(tmp_path / "adapter")
    reloaded = qpass_peft.load_adapter(load(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_qlora_recipe_trains_adapters_on_a_frozen_quantized_base(fmt):
    torch.manual_seed(0)
    model = qpass.quantize(tiny_llama(), fmt)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        base_logits = model(ids).logits
    frozen = _quantized_tensors(model)

    model = qpass_peft.prepare_model_for_kbit_training(model)
    # transformers 5.23 renamed it is_activation_checkpointing (the old name warns, and goes in 6)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    peft_model = qpass_peft.get_peft_model(model, config)

    assert set(peft_model.peft_config["default"].target_modules) == LLAMA_LINEARS  # lm_head left out
    assert config.target_modules == "all-linear"  # the caller's config is not changed
    adapted = [m for m in peft_model.modules() if isinstance(m, qpass_peft.QuantizedLoraLinear)]
    assert len(adapted) == len(LLAMA_LINEARS)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    with torch.no_grad():  # B starts at zero: the adapted model computes exactly the quantized one
        assert torch.equal(peft_model(ids).logits, base_logits)

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    after = _quantized_tensors(peft_model)
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_quantized_layers_exactly(reentrant):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = qpass.quantize(tiny_llama(), qpass.NF4Config(compute_dtype=torch.float32))
        model = qpass_peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                           gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.is_gradient_checkpointing == checkpointing
        peft_model = qpass_peft.get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        _randomize_lora_b(peft_model)
        peft_model.train()
        peft_model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_adapter_saved_by_peft_loads_onto_a_fresh_quantized_base(tmp_path):
    torch.manual_seed(0)
    peft_model = qpass_peft.get_peft_model(qpass.quantize(tiny_llama(), "nf4"),
                                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomize_lora_b(peft_model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()

    loaded = qpass_peft.load_adapter(qpass.quantize(tiny_llama(), "nf4"), tmp_path)
    assert isinstance(loaded, PeftModel)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference unless is_trainable=True
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    trainable = qpass_peft.load_adapter(qpass.quantize(tiny_llama(), "nf4"), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize(("build", "targets"), [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn"])])
def test_merge_requantizes_dequantized_weight_plus_delta(build, targets):
    torch.manual_seed(0)
    model = qpass.quantize(build(), qpass.NF4Config(compute_dtype=torch.float32))
    fan_in_fan_out = build is tiny_gpt2  # PEFT's setting for GPT-2's Conv1D; qpass holds [out, in] anyway
    peft_model = qpass_peft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             fan_in_fan_out=fan_in_fan_out))
    _randomize_lora_b(peft_model)
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, qpass_peft.QuantizedLoraLinear)}
    assert layers
    expected = {}
    for name, layer in layers.items():
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        base = layer.get_base_layer()
        expected[name] = quantize_weight(base.dequantize(torch.float32) + delta.detach(), base.layout.config)[1]
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        with peft_model.disable_adapter():
            quantized_only = peft_model(ids).logits

    merged = peft_model.merge_and_unload()
    for name, layer in layers.items():
        base = merged.get_submodule(name.removeprefix("base_model.model."))
        assert isinstance(base, qpass.QuantizedLinear)
        for t_name, t in expected[name].items():
            if t is not None:
                assert torch.equal(base.quantized_tensors[t_name], t), (name, t_name)
    with torch.no_grad():
        merged_logits = merged(ids).logits
    # merging adds one NF4 rounding: the merged model sits nearer the adapted one than the base does
    assert relative_error(merged_logits, unmerged) < relative_error(quantized_only, unmerged)


@pytest.mark.parametrize("spec", ["nf4", "int8", qpass.NF4Config(quant_storage=torch.bfloat16)], ids=str)
def test_trainable_parameters_count_the_quantized_weights(tmp_path, capsys, spec):
    """print_trainable_parameters, which trainers log, gives the unquantized model's numbers: PEFT alone
    would count two NF4 weights per packed byte (one int8 weight per byte), or none when the codes are
    a buffer (a float quant_storage)."""
    import copy

    from peft import get_peft_model as peft_get_peft_model

    config = LoraConfig(r=4, target_modules="all-linear")
    expected = peft_get_peft_model(tiny_llama(), copy.deepcopy(config)).get_nb_trainable_parameters()
    model = qpass_peft.get_peft_model(qpass.quantize(tiny_llama(), spec), config)
    assert model.get_nb_trainable_parameters() == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected[0]:,d} || all params: {expected[1]:,d}" in capsys.readouterr().out
    torch.save(model, tmp_path / "model.pt")  # the whole model pickles; a copy counts its own parameters
    for copied in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert copied.get_nb_trainable_parameters() == expected
        copied.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.requires_grad_(False)
        assert copied.get_nb_trainable_parameters()[0] == expected[0] - 4 * 64
    assert model.get_nb_trainable_parameters() == expected
    model.save_pretrained(tmp_path / "adapter")
    loaded = qpass_peft.load_adapter(qpass.quantize(tiny_llama(), spec), tmp_path / "adapter", is_trainable=True)
    assert loaded.get_nb_trainable_parameters() == expected


@pytest.mark.parametrize("spec", ["nf4", qpass.NF4Config(quant_storage=torch.bfloat16), "int8"], ids=str)
def test_peft_own_kbit_preparation_leaves_the_quantized_tensors_alone(spec):
    """peft.prepare_model_for_kbit_training freezes every parameter and casts bf16/fp16 ones to float32:
    the packed codes, a parameter in uint8/int8 and a buffer in a float quant_storage, keep their bytes."""
    model = qpass.quantize(tiny_llama(dtype=torch.bfloat16), spec)
    ids = torch.randint(0, 128, (1, 8))
    frozen = _quantized_tensors(model)
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    after = _quantized_tensors(model)
    assert after.keys() == frozen.keys()
    assert all(t.dtype == frozen[k].dtype and same_bytes(t, frozen[k]) for k, t in after.items())
    assert model.model.norm.weight.dtype == torch.float32  # what it casts
    assert not model(ids).logits.isnan().any()


def test_a_second_adapter_and_per_row_adapter_choice():
    torch.manual_seed(0)
    peft_model = qpass_peft.get_peft_model(qpass.quantize(tiny_llama(), "nf4"),
                                           LoraConfig(r=4, target_modules=["q_proj"]))
    second = qpass_peft.prepare_lora_config(LoraConfig(r=2, target_modules="all-linear"), peft_model)
    assert set(second.target_modules) == LLAMA_LINEARS
    peft_model.add_adapter("second", second)
    _randomize_lora_b(peft_model)
    peft_model.eval()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        peft_model.set_adapter("default")
        first_logits = peft_model(ids).logits
        peft_model.set_adapter("second")
        second_logits = peft_model(ids).logits
        mixed = peft_model(ids, adapter_names=["default", "second"]).logits
    assert relative_error(first_logits, second_logits) > 0.01
    torch.testing.assert_close(mixed, torch.stack([first_logits[0], second_logits[1]]))


def test_merge_into_a_bf16_model_keeps_the_layers_original_dtype():
    """The merged weight is float32, the layer's original bfloat16: its layout (and a checkpoint's
    quant_state dtype) keeps saying bfloat16."""
    model = qpass.quantize(tiny_llama(dtype=torch.bfloat16), "nf4")
    layout = model.model.layers[0].self_attn.q_proj.layout
    peft_model = qpass_peft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    _randomize_lora_b(peft_model)
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = peft_model.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert layer.layout == layout and layer.layout.source_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(merged(torch.randint(0, 128, (1, 5))).logits).all()


def test_merging_a_whole_model_warns_once():
    """The re-quantization warning names the adapter, not the layer, so Python's default filter shows
    it once for a merge_and_unload over every layer (SmolLM2 has 210), not once per layer."""
    peft_model = qpass_peft.get_peft_model(qpass.quantize(tiny_llama(), "nf4"),
                                           LoraConfig(r=4, target_modules="all-linear"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        peft_model.merge_and_unload()
    merged = [w for w in caught if "re-quantizes" in str(w.message)]
    assert len(merged) == 1 and "'default'" in str(merged[0].message), [str(w.message) for w in caught]


def test_unmerge_subtracts_the_delta_again():
    torch.manual_seed(0)
    peft_model = qpass_peft.get_peft_model(qpass.quantize(tiny_llama(), "int8"),
                                           LoraConfig(r=4, target_modules=["o_proj"]))
    _randomize_lora_b(peft_model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.o_proj
    base = layer.get_base_layer()
    delta = layer.get_delta_weight("default")
    layer.merge()
    assert layer.merged
    expected = quantize_weight(base.dequantize(torch.float32) - delta, base.layout.config)[1]
    layer.unmerge()
    assert not layer.merged
    assert all(torch.equal(base.quantized_tensors[k], t) for k, t in expected.items() if t is not None)


def test_merged_lora_bias_is_the_scaled_bias_the_forward_adds():
    torch.manual_seed(0)
    net = qpass.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), qpass.NF4Config(compute_dtype=torch.float32))
    peft_model = qpass_peft.get_peft_model(net, LoraConfig(r=2, lora_alpha=8, target_modules=["0"], lora_bias=True))
    _randomize_lora_b(peft_model)
    layer = peft_model.base_model.model[0]
    base = layer.get_base_layer()
    x = torch.randn(3, 64)
    with torch.no_grad():
        adapted = layer(x)
        exact_weight = base.dequantize(torch.float32) + layer.get_delta_weight("default")
        layer.merge()
        # merged and adapted outputs differ by the weight's re-quantization alone: the bias is exact
        requantization = x @ (base.dequantize(torch.float32) - exact_weight).T
        torch.testing.assert_close(base(x), adapted + requantization, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("option", "message"), [
    ({"use_dora": True}, r"LoRA layer 'model\.layers\.0\.self_attn\.q_proj': DoraLinearVariant reads the base weight"),
    ({"init_lora_weights": "pissa"}, r"LoRA layer 'model\.layers\.0\.self_attn\.q_proj': init_lora_weights='pissa'"),
    ({"init_lora_weights": "olora"}, r"init_lora_weights='olora' initialises the adapter from the base weight"),
])
def test_options_that_read_the_packed_weight_are_refused(option, message):
    model = qpass.quantize(tiny_llama(), "nf4")
    with pytest.raises(ValueError, match=message):
        qpass_peft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], **option))


def test_a_broken_adapter_is_not_merged():
    peft_model = qpass_peft.get_peft_model(qpass.quantize(tiny_llama(), "nf4"),
                                           LoraConfig(r=4, target_modules=["q_proj"]))
    layer = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    before = {k: t.clone() for k, t in layer.get_base_layer().quantized_tensors.items() if t is not None}
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.q_proj': adapter 'default' makes the weight"):
        layer.merge()
    assert not layer.merged
    assert all(torch.equal(layer.get_base_layer().quantized_tensors[k], t) for k, t in before.items())


def test_all_linear_without_linear_layers_says_so():
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4))
    with pytest.raises(ValueError, match="no linear layer besides its output embedding"):
        qpass_peft.prepare_lora_config(LoraConfig(target_modules="all-linear"), model)


def test_compiled_adapted_model_matches_eager_with_no_graph_break():
    torch.manual_seed(0)
    peft_model = qpass_peft.get_peft_model(qpass.quantize(tiny_llama(), "nf4"),
                                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomize_lora_b(peft_model)
    ids = torch.randint(0, 128, (2, 16))

    def grads(model):
        peft_model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = grads(peft_model)
    compiled_loss, compiled_grads = grads(torch.compile(peft_model, fullgraph=True))
    assert relative_error(compiled_loss, eager_loss) < COMPILE_VS_EAGER_BF16
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        assert relative_error(compiled_grads[name], grad) < COMPILE_VS_EAGER_BF16, name


@pytest.mark.parametrize("bf16", [False, True])
def test_hf_trainer_trains_qlora_on_a_model_loaded_with_a_qpass_config(tmp_path, bf16):
    """The usual QLoRA script: transformers loads the model with a QPassConfig, PEFT wraps it (as trl
    does, from a LoraConfig), and the HF Trainer trains and saves the adapter, also in bf16 mixed
    precision (autocast, which leaves qpass' ops alone). The Trainer refuses the quantized model
    without adapters, as it refuses a bitsandbytes one."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    tiny_llama().save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", device_map="cpu",
                                                 quantization_config=qpass.QPassConfig("nf4"))
    args = TrainingArguments(tmp_path / "run", per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
                             use_cpu=True, bf16=bf16, report_to=[], logging_steps=1, save_strategy="no")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=data)

    model = qpass_peft.prepare_model_for_kbit_training(model)
    model = peft.get_peft_model(model, qpass_peft.prepare_lora_config(LoraConfig(r=4, target_modules="all-linear"),
                                                                      model))
    frozen = _quantized_tensors(model)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.95 * losses[0], losses
    after = _quantized_tensors(model)
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)

    trainer.save_model(tmp_path / "adapter")
    reloaded = qpass_peft.load_adapter(qpass.quantize(tiny_llama(), "nf4"), tmp_path / "adapter")
    # with bf16, accelerate has wrapped the trained model's forward in autocast for good (outputs in float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.testing.assert_close(reloaded(input_ids=ids[:2]).logits.float(), model.eval()(input_ids=ids[:2]).logits)
