"""Bit-exactness against bitsandbytes 0.50 itself (its quantizers run on CPU)."""

import bitsandbytes.functional as bnbf
import pytest
import torch

import qpass
from qpass.formats import quantize_weight
from qpass.kernels import codebooks

from models import same_bytes

SHAPES = [(1, 1), (7, 9), (64, 64), (300, 70), (33, 257), (128, 1000), (3, 4096)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb_4bit(w, config):
    return bnbf.quantize_4bit(
        w,
        blocksize=config.blocksize,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=config.quant_storage,
    )


def _assert_4bit_matches(w, config):
    packed_ref, state = _bnb_4bit(w, config)
    layout, t = quantize_weight(w, config)
    assert t["weight"].dtype == packed_ref.dtype and same_bytes(t["weight"], packed_ref)
    assert torch.equal(t["absmax"], state.absmax)
    assert torch.equal(t["quant_map"].view(torch.int32), state.code.view(torch.int32))
    if config.double_quant:
        assert torch.equal(t["nested_absmax"], state.state2.absmax)
        assert torch.equal(t["nested_quant_map"], state.state2.code)
        assert torch.equal(t["offset"], state.offset)
    else:
        assert t["nested_absmax"] is None and t["offset"] is None
    # Dequantization agrees to the bit as well.
    ours = layout.dequantize(t, w.dtype)
    theirs = bnbf.dequantize_4bit(packed_ref, state)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_bit_exact(quant_type, dtype, shape, double_quant):
    config = qpass.NF4Config if quant_type == "nf4" else qpass.FP4Config
    w = torch.randn(shape, dtype=dtype) * 0.05
    _assert_4bit_matches(w, config(double_quant=double_quant))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_4bit_every_blocksize(blocksize):
    w = torch.randn(96, 333, dtype=torch.bfloat16)  # 31968 elements: never a multiple of the block size
    _assert_4bit_matches(w, qpass.NF4Config(blocksize=blocksize))
    _assert_4bit_matches(w, qpass.FP4Config(blocksize=blocksize))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_4bit_quant_storage_views_the_same_bytes(storage):
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    _assert_4bit_matches(w, qpass.NF4Config(quant_storage=storage))


def test_4bit_special_values():
    # zeros, a zero block, exact code values, ties on midpoints, tiny and huge magnitudes
    w = torch.zeros(4, 64)
    w[1] = torch.tensor(codebooks.NF4_CODE).repeat(4)
    w[2] = torch.linspace(-1, 1, 64)
    w[3, :32] = 1e-30
    w[3, 32:] = -3e30
    for config in (qpass.NF4Config(), qpass.FP4Config(), qpass.NF4Config(double_quant=False)):
        _assert_4bit_matches(w, config)


def test_double_quant_on_wide_absmax_range():
    # absmax spanning several orders of magnitude exercises every region of the dynamic map
    w = torch.randn(512, 512) * torch.logspace(-4, 1, 512).unsqueeze(1)
    _assert_4bit_matches(w, qpass.NF4Config())


def test_blockwise_8bit_matches_bnb_on_many_values():
    x = torch.cat([torch.randn(100_000) * 0.1, torch.rand(60_000) * 2 - 1, torch.tensor([1.0, -1.0, 0.0, 0.5, -0.5])])
    codes_ref, state = bnbf.quantize_blockwise(x, blocksize=256)
    codes, absmax = torch.ops.qpass.quantize_blockwise_8bit(x, codebooks.dynamic_code(), 256)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(codes, codes_ref)


def test_code_books_match_bnb():
    def same_bytes(a, b):  # torch.equal would let -0.0 pass for +0.0
        return torch.equal(a.view(torch.int32), b.view(torch.int32))

    assert same_bytes(codebooks.code_4bit("nf4"), bnbf.get_4bit_type("nf4", device="cpu"))
    assert same_bytes(codebooks.code_4bit("fp4"), bnbf.get_4bit_type("fp4", device="cpu"))
    assert same_bytes(codebooks.dynamic_code(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (300, 70), (64, 4096)], ids=str)
def test_int8_weights_bit_exact(dtype, shape):
    w = torch.randn(shape, dtype=dtype) * 0.05
    w[0, 0] = 0.9  # a large weight in row 0
    cb_ref, scb_ref, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16).contiguous())
    _, t = quantize_weight(w, qpass.Int8Config())
    assert t["weight"].dtype == torch.int8 and torch.equal(t["weight"], cb_ref)
    assert torch.equal(t["SCB"], scb_ref)


@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.5])
def test_int8_activation_quant_matches_bnb(threshold):
    x = torch.randn(17, 96, dtype=torch.float16)
    x[3, 5] = 9.0
    x[11, 40] = -7.5
    ca_ref, sca_ref, cols_ref = bnbf.int8_vectorwise_quant(x.clone(), threshold=threshold)
    ca, sca, mask = torch.ops.qpass.int8_vectorwise_quant(x, threshold)
    assert torch.equal(ca, ca_ref)
    assert torch.equal(sca, sca_ref)
    expected_mask = torch.zeros(96, dtype=torch.bool)
    if cols_ref is not None:
        expected_mask[cols_ref] = True
    assert torch.equal(mask, expected_mask)


def test_real_weights_bit_exact(minilm_weights):
    for name, w in minilm_weights.items():
        for config in (qpass.NF4Config(), qpass.FP4Config(double_quant=False), qpass.NF4Config(blocksize=128)):
            _assert_4bit_matches(w, config)
        cb_ref, scb_ref, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        _, t = quantize_weight(w, qpass.Int8Config())
        assert torch.equal(t["weight"], cb_ref) and torch.equal(t["SCB"], scb_ref), name
