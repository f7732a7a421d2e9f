"""DistributedDataParallel over quantized models (qpass.data_parallel), on CPU with the gloo backend:
DDP leaves the quantized tensors out of the buffers it broadcasts before every forward, and still
synchronises everything that trains."""

import copy
import gc
import pickle

import peft
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig
from torch.nn.parallel import DistributedDataParallel as DDP

import qpass
from qpass.data_parallel import ignore_quantized_tensors_in_ddp, quantized_tensor_names
from qpass.integrations import peft as qpass_peft

from models import tiny_llama

ROTARY_BUFFERS = {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}


@pytest.fixture
def process_group(tmp_path):
    """A gloo group of one process: enough for DDP to decide what it synchronises."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _qlora(model, wrap_with_qpass=True):
    config = LoraConfig(r=4, target_modules="all-linear")
    if wrap_with_qpass:
        return qpass_peft.get_peft_model(model, config)
    return peft.get_peft_model(model, qpass_peft.prepare_lora_config(config, model))  # as trl's peft_config does


def _broadcast_each_forward(ddp):
    """Names of the buffers DDP broadcasts before each forward."""
    return set(ddp.named_module_buffers) if ddp.will_sync_module_buffers() else set()


def _bare_names(names):
    return {name.removeprefix("base_model.model.").replace(".base_layer", "") for name in names}


@pytest.mark.parametrize("peft_route", ["qpass", "peft"])
def test_ddp_broadcasts_no_quantized_tensor_and_syncs_every_trainable_one(process_group, peft_route):
    model = _qlora(qpass.quantize(tiny_llama(), "nf4"), wrap_with_qpass=peft_route == "qpass")
    buffers = {name for name, _ in model.named_buffers()}
    quantized = buffers - {"base_model.model." + name for name in ROTARY_BUFFERS}
    assert len(quantized) > 14 * 3 and all(".base_layer." in name for name in quantized)

    ddp = DDP(model)
    ids = torch.randint(0, 128, (2, 8))
    ddp(input_ids=ids, labels=ids).loss.backward()

    assert _bare_names(_broadcast_each_forward(ddp)) <= ROTARY_BUFFERS
    assert quantized <= ddp.parameters_to_ignore
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 14 * 2 and not trainable & ddp.parameters_to_ignore


def test_without_qpass_marking_ddp_would_broadcast_every_quantized_tensor(process_group):
    """What the marking prevents: the same model without it has DDP broadcast its whole quantized
    weight before every forward."""
    model = _qlora(qpass.quantize(tiny_llama(), "nf4"))
    del model.base_model.model._ddp_params_and_buffers_to_ignore
    buffers = {name for name, _ in model.named_buffers()}
    assert len(buffers) > 14 * 3 and buffers == _broadcast_each_forward(DDP(model))


@pytest.mark.parametrize("loader", ["from_pretrained", "transformers"])
def test_loaded_models_carry_the_marking(process_group, tmp_path, loader):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "fp")
    if loader == "from_pretrained":
        model = qpass.from_pretrained(tmp_path / "fp", "int8")
    else:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", device_map="cpu",
                                                     quantization_config=qpass.QPassConfig("int8"))
    assert len(quantized_tensor_names(model)) == 14 * 2  # weight and SCB
    ddp = DDP(_qlora(model))
    assert _bare_names(_broadcast_each_forward(ddp)) <= ROTARY_BUFFERS


def test_dequantized_weights_are_synchronised_again(process_group):
    """The names are read when DDP is built: after qpass.dequantize the weight names are parameters
    that may train, and DDP must reduce their gradients."""
    model = qpass.dequantize(qpass.quantize(tiny_llama(), "nf4"))
    assert list(model._ddp_params_and_buffers_to_ignore) == []
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    ddp = DDP(model)
    assert not ddp.parameters_to_ignore
    assert {"model.rotary_emb.inv_freq"} <= _broadcast_each_forward(ddp)


def test_copies_name_their_own_tensors_and_names_set_before_stay():
    model = tiny_llama()
    DDP._set_params_and_buffers_to_ignore_for_model(model, ["model.embed_tokens.weight"])
    qpass.quantize(model, "int8")
    names = list(model._ddp_params_and_buffers_to_ignore)
    assert "model.embed_tokens.weight" in names and "model.layers.0.mlp.up_proj.SCB" in names

    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        qpass.dequantize(twin)  # the copy's list follows the copy, not the original
        assert list(twin._ddp_params_and_buffers_to_ignore) == ["model.embed_tokens.weight"]
        assert list(model._ddp_params_and_buffers_to_ignore) == names

    assert ignore_quantized_tensors_in_ddp(model) is model and list(model._ddp_params_and_buffers_to_ignore) == names

    held = model._ddp_params_and_buffers_to_ignore  # held weakly: a deleted model is not kept alive
    del model, twin
    gc.collect()
    assert list(held) == list(pickle.loads(pickle.dumps(held))) == ["model.embed_tokens.weight"]


def _train_ranks(rank, world_size, store, steps, results):
    """One rank of a QLoRA run: each rank trains on its own batch; DDP averages the gradients."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        model = _qlora(qpass.quantize(tiny_llama(), "nf4"))
        before = {name: t.clone() for name, t in model.named_buffers()}
        ddp = DDP(model)
        optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(rank))
        for _ in range(steps):
            ddp(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results[rank] = {
            "broadcast": sorted(_broadcast_each_forward(ddp)),
            "trained": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "buffers_kept": all(torch.equal(t, before[n]) for n, t in model.named_buffers()),
        }
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_the_same_adapters_as_one_process_on_both_batches(tmp_path):
    """Two gloo processes, each with its own batch: their adapters stay identical, and equal to one
    process training on both batches at once (DDP's mean of the ranks' gradients); every broadcast
    leaves the quantized tensors out and no process changes them."""
    steps, manager = 3, mp.Manager()
    results = manager.dict()
    mp.spawn(_train_ranks, args=(2, tmp_path / "store", steps, results), nprocs=2)

    model = _qlora(qpass.quantize(tiny_llama(), "nf4"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(rank)) for rank in range(2)]
    for _ in range(steps):
        (sum(model(input_ids=ids, labels=ids).loss for ids in batches) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()

    for rank in range(2):
        assert _bare_names(results[rank]["broadcast"]) <= ROTARY_BUFFERS
        assert results[rank]["buffers_kept"]
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(results[rank]["trained"][name], param.detach(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in results[0]["trained"].items() if "lora_B" in n)
