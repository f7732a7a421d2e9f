"""Data-parallel training of quantized models, on CPU: DistributedDataParallel (qpass.data_parallel,
gloo backend) leaves the quantized tensors out of the buffers it broadcasts before every forward and
still synchronises everything that trains; nn.DataParallel's replicas compute with their own copies;
FSDP2 shards the packed weights, FSDP1 takes them as ignored."""

import copy
import functools
import gc
import importlib
import pickle
from unittest import mock

import peft
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig
from torch.nn.parallel import DistributedDataParallel as DDP

import qpass
from qpass.data_parallel import ignore_quantized_tensors_in_ddp, quantized_parameters, quantized_tensor_names
from qpass.integrations import peft as qpass_peft
from qpass.modules import QuantizedLinear

from models import bare_name, tiny_llama

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
    return {bare_name(name) for name in names}


def _packed_weights(model):
    """Names of the packed weights of a qpass model: frozen parameters (``quantized_parameters``)."""
    packed = quantized_parameters(model)
    return {name for name, p in model.named_parameters() if p in packed}


def _sent_when_ddp_starts(ddp):
    """Names of the parameters DDP broadcasts from rank 0 when it is built."""
    sent = {id(p) for p in ddp._module_parameters}
    return {name for name, p in ddp.module.named_parameters() if id(p) in sent}


@pytest.mark.parametrize("peft_route", ["qpass", "peft"])
def test_ddp_broadcasts_no_quantized_tensor_and_syncs_every_trainable_one(process_group, peft_route):
    model = _qlora(qpass.quantize(tiny_llama(), "nf4"), wrap_with_qpass=peft_route == "qpass")
    buffers = {name for name, _ in model.named_buffers()}
    scales = buffers - {"base_model.model." + name for name in ROTARY_BUFFERS}
    packed = _packed_weights(model)
    assert len(scales) > 14 * 3 and all(".base_layer." in name for name in scales) and len(packed) == 14

    ddp = DDP(model)
    ids = torch.randint(0, 128, (2, 8))
    ddp(input_ids=ids, labels=ids).loss.backward()

    assert _bare_names(_broadcast_each_forward(ddp)) <= ROTARY_BUFFERS
    assert scales | packed <= ddp.parameters_to_ignore and not packed & _sent_when_ddp_starts(ddp)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 14 * 2 and not trainable & ddp.parameters_to_ignore


def test_without_qpass_marking_ddp_would_broadcast_every_quantized_tensor(process_group):
    """What the marking prevents: the same model without it has DDP broadcast its packed weights when
    it starts and its scales before every forward."""
    model = _qlora(qpass.quantize(tiny_llama(), "nf4"))
    del model.base_model.model._ddp_params_and_buffers_to_ignore
    buffers = {name for name, _ in model.named_buffers()}
    ddp = DDP(model)
    assert len(buffers) > 14 * 3 and buffers == _broadcast_each_forward(ddp)
    assert len(_packed_weights(model)) == 14 and _packed_weights(model) <= _sent_when_ddp_starts(ddp)


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
    assert len(quantized_parameters(model)) == 14  # the packed weights are parameters, however loaded
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


def _batch(rank):
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(rank))


def _train(model, batches, steps, optimizer=None):
    """``steps`` of AdamW on the mean loss over ``batches`` (a rank's one batch, or every rank's)."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        (sum(model(input_ids=ids, labels=ids).loss for ids in batches) / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()


def _assert_ranks_trained_as_one_process(results, fmt, steps):
    """Each rank's adapters equal one process's trained on both ranks' batches at once (the mean of the
    ranks' gradients, which DDP and FSDP take)."""
    model = _qlora(qpass.quantize(tiny_llama(), fmt))
    _train(model, [_batch(rank) for rank in range(2)], steps)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for rank in range(2):
        assert results[rank]["trained"].keys() == trainable.keys()
        for name, param in trainable.items():
            torch.testing.assert_close(results[rank]["trained"][name], param, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trainable.items() if "lora_B" in n)  # it trained
    return model


def _train_ranks(rank, world_size, store, steps, results):
    """One rank of a QLoRA run: each rank trains on its own batch; DDP averages the gradients."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        model = _qlora(qpass.quantize(tiny_llama(), "nf4"))
        frozen = {name: t.clone() for name, t in model.state_dict().items() if "lora_" not in name}
        ddp = DDP(model)
        _train(ddp, [_batch(rank)], steps)
        results[rank] = {
            "broadcast": sorted(_broadcast_each_forward(ddp)),
            "trained": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "frozen_kept": all(torch.equal(t, frozen[n]) for n, t in model.state_dict().items() if n in frozen),
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

    _assert_ranks_trained_as_one_process(results, "nf4", steps)
    for rank in range(2):
        assert _bare_names(results[rank]["broadcast"]) <= ROTARY_BUFFERS
        assert results[rank]["frozen_kept"]



def _broadcast_as_clones(tensors, devices, detach=False):
    """What ``replicate``'s CUDA broadcast gives, one copy of each tensor per device, as CPU clones: a
    copy keeps autograd to the original unless ``detach`` (gradients of the replicas add up there)."""
    return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]


@pytest.mark.parametrize("spec", ["nf4", "int8", qpass.NF4Config(quant_storage=torch.bfloat16)],
                         ids=["nf4", "int8", "nf4-bf16-storage"])
def test_data_parallel_replicas_compute_with_their_own_copies_and_train_the_adapters(spec):
    """``nn.DataParallel`` (what the HF Trainer wraps a model in when one process sees several GPUs;
    it leaves bitsandbytes models unwrapped) copies the model to each GPU with ``replicate``, which sets
    each copied tensor on a bare copy of each module with ``setattr``. A ``QuantizedLinear`` copy must
    then compute with its own copies (on a GPU, the tensors on its device), and the replicas' gradients
    must add up on the adapters. The CUDA broadcast is replaced by clones on the CPU."""
    model = _qlora(qpass.quantize(tiny_llama(), spec))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.cat([_batch(0), _batch(1)])
    adapters = {name: p for name, p in model.named_parameters() if p.requires_grad}

    model(input_ids=ids).logits.square().sum().backward()
    one_process = {name: p.grad.clone() for name, p in adapters.items()}
    model.zero_grad()

    replicate_module = importlib.import_module("torch.nn.parallel.replicate")
    with mock.patch.object(replicate_module, "_broadcast_coalesced_reshape", _broadcast_as_clones):
        replicas = replicate_module.replicate(model, [0, 1])
    sum(replica(input_ids=half).logits.square().sum() for replica, half in zip(replicas, ids.chunk(2))).backward()

    for name, grad in one_process.items():
        torch.testing.assert_close(adapters[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    originals = dict(model.named_modules())
    for replica in replicas:
        layers = {name: m for name, m in replica.named_modules() if isinstance(m, QuantizedLinear)}
        assert len(layers) == 14
        for name, layer in layers.items():
            for tensor_name, tensor in layer.quantized_tensors.items():
                original = originals[name].quantized_tensors[tensor_name]
                assert tensor.data_ptr() != original.data_ptr(), (name, tensor_name)
                # compared as bytes: codes held in a float quant_storage include NaN patterns
                as_bytes = [t.flatten().view(torch.uint8) for t in (tensor, original)]
                assert torch.equal(*as_bytes), (name, tensor_name)


# torch 2.11's fully_shard makes every parameter it shards require grad, which integer codes cannot (2.12
# passes the parameter's own requires_grad).
FSDP2_SHARDS_INTEGER_PARAMETERS = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12)


def _shard_with_fully_shard(model, shard_quantized):
    """``fully_shard`` on every decoder layer and the model, the packed weights sharded or, with
    ``ignored_params``, left whole (torch 2.11's way)."""
    from torch.distributed.fsdp import fully_shard

    ignored = None if shard_quantized else quantized_parameters(model)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


def _shard_with_accelerate(model):
    """``Accelerator.prepare`` with an FSDP2 plugin wrapping each decoder layer: the HF Trainer's path
    with ``fsdp_config={"fsdp_version": 2}`` (accelerate's ``fsdp2_prepare_model``). accelerate allows
    FSDP on accelerators only, so the test sets the distributed type a GPU launch would give; the rest
    is accelerate's own code, its optimizer re-pointing included."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=str(dist.get_rank()),
                      WORLD_SIZE=str(dist.get_world_size()), LOCAL_WORLD_SIZE=str(dist.get_world_size()))
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer


def _fsdp_train_ranks(rank, world_size, store, fmt, wrapper, steps, results):
    """One rank of an FSDP2 QLoRA run (``wrapper``: "sharded" or "ignored_params", ``fully_shard`` by
    hand; "accelerate", accelerate's FSDP2), each rank on its own batch."""
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        model = _qlora(qpass.quantize(tiny_llama(), fmt))
        names = _packed_weights(model)
        packed = {name: p.detach().clone() for name, p in model.named_parameters() if name in names}
        if wrapper == "accelerate":
            model, optimizer = _shard_with_accelerate(model)
        else:
            model, optimizer = _shard_with_fully_shard(model, wrapper == "sharded"), None
        _train(model, [_batch(rank)], steps, optimizer)
        held = dict(model.named_parameters())
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
        results[rank] = {
            "trained": {n: p.full_tensor().detach().clone() for n, p in held.items() if p.requires_grad},
            "packed_bytes": sum(t.nbytes for t in packed.values()),
            "packed_bytes_held": sum(local(held[n]).nbytes for n in packed),
            "packed_kept": all(torch.equal(whole(held[n]), t) for n, t in packed.items()),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("fmt", "wrapper"), [("nf4", "sharded"), ("int8", "sharded"), ("nf4", "ignored_params"),
                                             ("int8", "ignored_params"), ("nf4", "accelerate")])
def test_fsdp2_trains_the_adapters_of_one_process_with_the_packed_weights_sharded(tmp_path, fmt, wrapper):
    """FSDP2 shards parameters only: the packed weight is one (a frozen ``nn.Parameter``), so each of two
    ranks holds half of the packed bytes (or all of them, given as ``ignored_params``, torch 2.11's
    way), and their adapters train to what one process gets from both batches (FSDP's mean of the ranks'
    gradients). accelerate's FSDP2 (the HF Trainer's ``fsdp_version: 2``) shards them the same way."""
    steps, manager = 3, mp.Manager()
    results = manager.dict()
    shard_quantized = wrapper != "ignored_params"
    run = functools.partial(mp.spawn, _fsdp_train_ranks, nprocs=2,
                            args=(2, tmp_path / "store", fmt, wrapper, steps, results))
    if shard_quantized and not FSDP2_SHARDS_INTEGER_PARAMETERS:  # what the README says of torch 2.11
        with pytest.raises(mp.ProcessRaisedException, match="only Tensors of floating point dtype can require grad"):
            run()
        return
    run()

    model = _assert_ranks_trained_as_one_process(results, fmt, steps)
    total = results[0]["packed_bytes"]
    assert total == sum(layer.weight.nbytes for layer in model.modules() if isinstance(layer, QuantizedLinear))
    for rank in range(2):
        if shard_quantized:
            assert results[rank]["packed_bytes_held"] <= 0.55 * total
        else:
            assert results[rank]["packed_bytes_held"] == total
        assert results[rank]["packed_kept"]
    if shard_quantized:
        assert results[0]["packed_bytes_held"] + results[1]["packed_bytes_held"] == total


def _fsdp1(model, **kwargs):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                device_id=torch.device("cpu"), **kwargs)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_fsdp1_takes_the_quantized_tensors_as_ignored_and_uncast_only(process_group, fmt):
    """FSDP1 flattens parameters, which integer codes cannot be; given them as ``ignored_states`` it
    runs, but its ``MixedPrecision(buffer_dtype=...)`` casts every float buffer in place, the scales
    included: the layer refuses to compute with them, naming itself. With buffer_dtype None (the
    README's recipe) the adapters train and the quantized tensors keep their bytes."""
    from torch.distributed.fsdp import MixedPrecision

    ids = _batch(0)
    model = qpass.quantize(tiny_llama(), fmt)
    with pytest.raises(ValueError, match="Cannot flatten integer dtype tensors"):
        _fsdp1(copy.deepcopy(model))

    copied = copy.deepcopy(model)
    cast = _fsdp1(copied, ignored_states=quantized_parameters(copied),
                  mixed_precision=MixedPrecision(torch.bfloat16, torch.bfloat16, buffer_dtype=torch.bfloat16))
    # the first layer the forward reaches; the first of its tensors FSDP1 casts
    cast_tensor = "quant_map" if fmt == "nf4" else "SCB"
    with pytest.raises(TypeError, match=rf"layer 'model\.layers\.0\.self_attn\.q_proj' \({fmt}, 64x64\): its quantized "
                                        rf"tensor '{cast_tensor}' is torch\.bfloat16, but the format holds it as "
                                        r"torch\.float32.*buffer_dtype None"):
        cast(input_ids=ids)

    model = _qlora(model)
    layers = [layer for layer in model.modules() if isinstance(layer, QuantizedLinear)]
    before = [{name: t.clone() for name, t in layer.quantized_tensors.items() if t is not None} for layer in layers]
    recipe = _fsdp1(model, ignored_states=quantized_parameters(model),
                    mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
    _train(recipe, [ids], steps=1)
    with type(recipe).summon_full_params(recipe):
        assert any(p.abs().sum() > 0 for n, p in recipe.named_parameters() if "lora_B" in n)  # it trained
    for layer, kept in zip(layers, before, strict=True):
        for name, t in kept.items():
            assert layer.quantized_tensors[name].dtype == t.dtype and torch.equal(layer.quantized_tensors[name], t)
