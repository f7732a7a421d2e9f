"""The Triton kernels against fp64 and against the reference op: on CUDA when there is one, otherwise
on CPU tensors under TRITON_INTERPRET=1 (small shapes: the interpreter runs kernels in NumPy)."""

import os

import pytest
import torch
import triton
import triton.language as tl

import qpass
from qpass.formats import quantize_weight
from qpass.kernels import ops, triton_4bit, triton_int8
from qpass.kernels.triton_4bit import GEMV_MAX_M, dequantize_4bit_triton, gemv_applies, linear_4bit_triton
from qpass.kernels.triton_common import gemm_split
from qpass.kernels.triton_int8 import _round_half_even, int8_vectorwise_quant_triton, linear_int8_triton

from kernel_writes import recorded_launches
from models import relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
assert not INTERPRETED or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET=1 without a GPU"

# Kernels run with their first config (``autotune=False``): every config of every kernel, tuned or not,
# compiles in tests/test_compile_report.py, and on a GPU test_autotuned_launches below runs the
# tuned ones; tuning each test shape would cost minutes of compilation on a lent GPU.
#
# Error of the kernel against the reference op on the same quantized weights. Both round operands to
# the compute dtype and accumulate in float32, so on a GPU only summation order and the final rounding
# differ (the GEMV rounds no weight and short GEMM tiles round the code instead of the weight: within
# one rounding per weight of the reference).
# The interpreter (NumPy) truncates float32 -> bf16 instead of rounding to nearest, which costs up to
# one bf16 ulp per weight: hence its looser bf16 bound.
VS_REFERENCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2 if INTERPRETED else 8e-3}
# Error against the exact fp64 product of x and the dequantized weight (what quantization cannot cause).
VS_FP64 = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# M=1, small M, M not a tile multiple, odd N; K a multiple of the block size (the row-aligned fast path
# every LLM layer takes) and not (blocks and bytes straddling rows: the general path)
SHAPES = [(1, 48, 128), (1, 48, 80), (3, 33, 256), (3, 33, 100), (17, 48, 192), (17, 48, 80), (33, 33, 100)]


def _inputs(m, n, k, dtype, outlier_column=None):
    x = torch.randn(m, k, device=DEVICE)
    if outlier_column is not None:
        x[:, outlier_column] *= 30
    return x.to(dtype), torch.randn(n, device=DEVICE) * 0.1


def _4bit_call(layout, t, x, bias, autotune=False, **overrides):
    c = layout.config
    return linear_4bit_triton(
        x, t["weight"], t["quant_map"], t["absmax"], t["nested_absmax"], t["nested_quant_map"], t["offset"], bias,
        layout.out_features, layout.in_features, c.blocksize, c.compute_dtype, autotune=autotune, **overrides,
    )


def _check(out, x, layout, t, bias, reference):
    dtype = layout.config.compute_dtype
    assert out.dtype == dtype and not out.isnan().any()
    exact = x.double() @ layout.dequantize(t, torch.float64).T
    if bias is not None:
        exact = exact + bias.double()
    assert relative_error(out, exact) < VS_FP64[dtype]
    assert relative_error(out, reference) < VS_REFERENCE[dtype]


def _check_int8(out, reference, dtype, context=None):
    """The int8 kernel's output against the reference op's (no fp64 bound: the activations are
    quantized, so the error against the exact product is the format's, not the kernel's)."""
    assert out.dtype == dtype and not out.isnan().any(), context
    assert relative_error(out, reference) < VS_REFERENCE[dtype], context


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("config", ["nf4", "fp4-no-dq"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_4bit_kernels(shape, dtype, config, has_bias):
    m, n, k = shape
    cls, dq = (qpass.NF4Config, True) if config == "nf4" else (qpass.FP4Config, False)
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, cls(double_quant=dq, compute_dtype=dtype))
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(m, n, k, dtype)
    bias = bias if has_bias else None
    out = _4bit_call(layout, t, x, bias)
    op, args = layout.linear_call(x, t, bias)
    with torch.no_grad():
        ref = _reference(op, args)
    _check(out, x, layout, t, bias, ref)


def _reference(op, args):
    """The op's reference path, whatever the device."""
    with ops.reference_kernels():
        return op(*args)


def test_4bit_blocks_straddling_rows():
    """K = 40 with blocksize 32: blocks (and, for odd K, bytes) cross row boundaries. The GEMM runs
    with its first config and with the first that computes the transposed tile (SWAP_AB)."""
    swapped = next(c for c in triton_4bit._gemm_configs() if c.kwargs["SWAP_AB"])
    for k in (40, 41):
        layout, t = quantize_weight(torch.randn(9, k), qpass.NF4Config(blocksize=32, compute_dtype=torch.float32))
        t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
        for m, config in ((1, None), (20, None), (20, swapped)):
            x, bias = _inputs(m, 9, k, torch.float32)
            op, args = layout.linear_call(x, t, bias)
            _check(_4bit_call(layout, t, x, bias, config=config), x, layout, t, bias, _reference(op, args))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("outliers", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
def test_int8_kernels(shape, dtype, outliers, has_bias):
    m, n, k = shape
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.Int8Config(compute_dtype=dtype))
    t = {name: v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(m, n, k, dtype, outlier_column=7 if outliers else None)
    bias = bias if has_bias else None
    ca, sca, mask, columns, count = int8_vectorwise_quant_triton(x, 6.0)
    ca_ref, sca_ref, mask_ref = torch.ops.qpass.int8_vectorwise_quant(x, 6.0)
    assert torch.equal(mask.bool(), mask_ref) and bool(mask[7]) == outliers
    assert torch.equal(columns[: int(count)].long(), mask_ref.nonzero().flatten())
    assert torch.equal(sca, sca_ref)
    if dtype != torch.bfloat16 or not INTERPRETED:  # the interpreter's bf16 loads may differ in the last bit
        assert torch.equal(ca, ca_ref)
    out = linear_int8_triton(x, t["weight"], t["SCB"], bias, 6.0, dtype, autotune=False)
    op, args = layout.linear_call(x, t, bias)
    _check_int8(out, _reference(op, args), dtype)


def test_ops_dispatch_to_the_kernels(monkeypatch):
    """The op bodies call the kernels with the right arguments (forced on for CPU tensors here)."""
    monkeypatch.setattr(ops, "use_triton", lambda x: True)
    if INTERPRETED:  # torch 2.11's wrap_triton refuses the interpreter's kernels; run eagerly, it only launches
        monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    for config in (qpass.NF4Config(compute_dtype=torch.float16), qpass.Int8Config(compute_dtype=torch.float16)):
        layout, t = quantize_weight(torch.randn(24, 64) * 0.05, config)
        t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
        x = torch.randn(2, 3, 64, device=DEVICE, dtype=torch.float32)
        op, args = layout.linear_call(x, t, None)
        out = op(*args)
        assert out.shape == (2, 3, 24) and out.dtype == torch.float32
        monkeypatch.setattr(ops, "use_triton", lambda x: False)
        assert relative_error(out, op(*args)) < VS_REFERENCE[torch.float16]
        monkeypatch.setattr(ops, "use_triton", lambda x: True)


def test_fuzz_random_shapes():
    """Random shapes and options; many more on a GPU than under the interpreter."""
    generator = torch.Generator().manual_seed(1234)
    trials = 6 if INTERPRETED else 200
    for _ in range(trials):
        m = int(torch.randint(1, 40 if INTERPRETED else 600, (1,), generator=generator))
        n = int(torch.randint(1, 70 if INTERPRETED else 3000, (1,), generator=generator))
        k = int(torch.randint(2, 140 if INTERPRETED else 3000, (1,), generator=generator))
        dtype = [torch.bfloat16, torch.float16][int(torch.randint(0, 2, (1,), generator=generator))]
        blocksize = [32, 64, 128][int(torch.randint(0, 3, (1,), generator=generator))]
        if torch.rand(1, generator=generator) < 0.5:  # half the time on the row-aligned fast path
            k = blocksize * max(1, k // blocksize)
        layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.NF4Config(blocksize=blocksize, compute_dtype=dtype))
        t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
        x, bias = _inputs(m, n, k, dtype)
        op, args = layout.linear_call(x, t, bias)
        _check(_4bit_call(layout, t, x, bias), x, layout, t, bias, _reference(op, args))
        layout8, t8 = quantize_weight(torch.randn(n, k) * 0.05, qpass.Int8Config(compute_dtype=dtype))
        t8 = {name: v.to(DEVICE) for name, v in t8.items()}
        out = linear_int8_triton(x, t8["weight"], t8["SCB"], bias, 6.0, dtype, autotune=False)
        op8, args8 = layout8.linear_call(x, t8, bias)
        _check_int8(out, _reference(op8, args8), dtype)


def test_both_4bit_kernels_are_exercised():
    packed = torch.empty(64, dtype=torch.uint8)
    assert any(gemv_applies(m, k, 64, packed) for m, _, k in SHAPES)
    assert any(not gemv_applies(m, k, 64, packed) for m, _, k in SHAPES)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024])
@pytest.mark.parametrize("m", [1, 2, 5, 20])
def test_4bit_block_sizes_on_both_kernels(blocksize, m):
    """GEMV (M <= GEMV_MAX_M) and GEMM half-tile paths for every block size: blocks per GEMV step (one
    qword or several blocks) and per GEMM tile."""
    n, k = 24, 2 * blocksize
    config = qpass.NF4Config(blocksize=blocksize, compute_dtype=torch.float16)
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, config)
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    assert gemv_applies(m, k, blocksize, t["weight"]) == (m <= GEMV_MAX_M)
    x, bias = _inputs(m, n, k, torch.float16)
    op, args = layout.linear_call(x, t, bias)
    _check(_4bit_call(layout, t, x, bias), x, layout, t, bias, _reference(op, args))


@pytest.mark.parametrize("m, k", [(5, 1024), (20, 1040), (1, 1040)], ids=str)
def test_4bit_gemm_split_k(m, k):
    """Small M on a long K splits K across programs (float32 partial sums, then bias); K = 1040 is not
    a multiple of the block size, so that case runs the general dequantization."""
    assert gemm_split(m, 8, k)[0] == 2
    layout, t = quantize_weight(torch.randn(8, k) * 0.05, qpass.NF4Config(compute_dtype=torch.float16))
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(m, 8, k, torch.float16)
    op, args = layout.linear_call(x, t, bias)
    _check(_4bit_call(layout, t, x, bias), x, layout, t, bias, _reference(op, args))


def test_4bit_unaligned_packed_storage_takes_the_gemm():
    """Packed bytes that cannot be read as int64 (a view at an odd offset) fall back to the GEMM."""
    layout, t = quantize_weight(torch.randn(16, 128) * 0.05, qpass.NF4Config(compute_dtype=torch.float32))
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    shifted = torch.empty(t["weight"].numel() + 1, dtype=torch.uint8, device=DEVICE)
    shifted[1:] = t["weight"].reshape(-1)
    t_shifted = {**t, "weight": shifted[1:].reshape(t["weight"].shape)}
    assert not gemv_applies(1, 128, 64, t_shifted["weight"]) and gemv_applies(1, 128, 64, t["weight"])
    for m in (1, 3):
        x, bias = _inputs(m, 16, 128, torch.float32)
        op, args = layout.linear_call(x, t, bias)
        _check(_4bit_call(layout, t_shifted, x, bias), x, layout, t, bias, _reference(op, args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_4bit_gemv_reads_x_at_any_offset(dtype):
    """The GEMV reads x as int64 words: a row of x that starts off an 8-byte boundary (a view into a
    larger buffer) is copied first. A GPU faults on a misaligned int64 load; the interpreter reads one
    correctly, so on CPU this checks only that the copy gives the same result."""
    layout, t = quantize_weight(torch.randn(16, 128) * 0.05, qpass.NF4Config(compute_dtype=dtype))
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    buffer, bias = _inputs(1, 16, 129, dtype)
    x = buffer[:, 1:]  # storage offset of one element: 2 or 4 bytes
    assert gemv_applies(1, 128, 64, t["weight"]) and x.storage_offset() * x.element_size() % 8
    op, args = layout.linear_call(x, t, bias)
    _check(_4bit_call(layout, t, x, bias), x, layout, t, bias, _reference(op, args))


@pytest.mark.parametrize("m", [1, 3, triton_4bit.DEQUANT_MATMUL_MIN_M], ids=["gemv", "gemm", "dequant"])
def test_4bit_kernels_read_a_float32_code_book(m):
    """The kernels read the code book's bits as float32 (on a GPU, a shuffle of each lane's own 32-bit
    value): a code book in another dtype, possible in a direct op call, reaches them as float32. The
    interpreter converts loads itself, so the launch is checked here, and the result on any device."""
    layout, t = quantize_weight(torch.randn(48, 128) * 0.05, qpass.NF4Config(compute_dtype=torch.float32))
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    t["quant_map"] = t["quant_map"].half()
    launches = []
    x, bias = _inputs(m, 48, 128, torch.float32)
    _4bit_call(layout, t, x, bias, launch=recorded_launches(launches))
    assert launches and all(arguments["code_ptr"].dtype == torch.float32 for _, arguments in launches)
    op, args = layout.linear_call(x, t, bias)
    _check(_4bit_call(layout, t, x, bias), x, layout, t, bias, _reference(op, args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("spec", ["nf4", "int8"])
@pytest.mark.parametrize("rows", [4, 1024], ids=["fused", "cublas"])
def test_cuda_graphs_capture_the_compiled_layers(spec, rows):
    """torch.compile(mode="reduce-overhead") replays the kernels as a CUDA graph: no host sync, static
    shapes, same result as eager; also where cuBLAS multiplies (from DEQUANT_MATMUL_MIN_M and
    INT_MM_MIN_M rows on)."""
    assert rows < 16 or rows >= max(triton_4bit.DEQUANT_MATMUL_MIN_M, triton_int8.INT_MM_MIN_M)
    model = qpass.quantize(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 128)).cuda(), spec)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    x[:, 3] *= 50  # outlier column for int8
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    compiled(x)  # compiles and warms up (Inductor itself syncs while compiling)
    torch.cuda.set_sync_debug_mode("error")  # from here on, any device-to-host sync raises
    try:
        for _ in range(3):  # records the graph, then replays it
            out = compiled(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert relative_error(out, eager) < VS_REFERENCE[torch.bfloat16]


GRADIENT_CONFIGS = {"nf4-bf16": qpass.NF4Config(), "int8-bf16": qpass.Int8Config(),
                    "nf4-fp16": qpass.NF4Config(compute_dtype=torch.float16)}


@pytest.mark.parametrize("name", GRADIENT_CONFIGS)
def test_input_gradient_on_the_kernel_device(name):
    """Backward through the ops where the kernels run (QLoRA's path): the input's gradient is
    grad_out @ W with compute-dtype operands and float32 accumulation (on CUDA a tensor-core GEMM)."""
    config = GRADIENT_CONFIGS[name]
    layout, t = quantize_weight(torch.randn(48, 256) * 0.05, config)
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    x = torch.randn(3, 5, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    op, args = layout.linear_call(x, t, None)
    out = op(*args)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    dtype = config.compute_dtype
    exact = grad_out.to(dtype).double() @ layout.dequantize(t, dtype).double()
    assert x.grad.dtype == torch.bfloat16 and relative_error(x.grad, exact) < VS_FP64[torch.bfloat16]


@pytest.mark.parametrize("k", [128, 100], ids=["gemv", "gemm"])
def test_empty_batch(k):
    """M = 0 (an empty batch) gives an empty result, not a launch error."""
    layout, t = quantize_weight(torch.randn(8, k) * 0.05, qpass.NF4Config(compute_dtype=torch.float16))
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    x = torch.empty(0, k, device=DEVICE, dtype=torch.float16)
    assert _4bit_call(layout, t, x, None).shape == (0, 8)
    layout8, t8 = quantize_weight(torch.randn(8, k) * 0.05, qpass.Int8Config(compute_dtype=torch.float16))
    t8 = {name: v.to(DEVICE) for name, v in t8.items()}
    out8 = linear_int8_triton(x, t8["weight"], t8["SCB"], None, 6.0, torch.float16, autotune=False)
    assert out8.shape == (0, 8)


@pytest.mark.parametrize("outliers", [True, False])
def test_int8_gemm_split_k(outliers):
    """Small M on a long K: both K loops (int8 and outlier columns) run per split."""
    m, n, k = 5, 8, 1024
    assert gemm_split(m, n, k)[0] == 2
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.Int8Config(compute_dtype=torch.float16))
    t = {name: v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(m, n, k, torch.float16, outlier_column=700 if outliers else None)
    out = linear_int8_triton(x, t["weight"], t["SCB"], bias, 6.0, torch.float16, autotune=False)
    op, args = layout.linear_call(x, t, bias)
    _check_int8(out, _reference(op, args), torch.float16)


def test_autotuner_times_tiles_between_a_quarter_of_m_and_m():
    """The GEMM autotuners prune by M's power-of-two bucket: tiles no taller than it (16 at least) and
    no shorter than a quarter of it, or the tallest tiles where M is beyond every tile."""
    from qpass.kernels.triton_common import prune_gemm_configs

    def heights(configs, bucket):
        return sorted({c.kwargs["BLOCK_M"] for c in prune_gemm_configs(configs, {"M_BUCKET": bucket})})

    fourbit, int8 = triton_4bit._gemm_configs(), triton_int8._gemm_configs()
    assert {c.kwargs["BLOCK_M"] for c in fourbit} == {16, 32, 64, 128}
    assert {c.kwargs["BLOCK_M"] for c in int8} == {16, 64, 128}
    assert heights(fourbit, 1) == heights(fourbit, 16) == heights(int8, 16) == [16]
    assert heights(fourbit, 64) == [16, 32, 64] and heights(int8, 64) == [16, 64]
    assert heights(fourbit, 128) == [32, 64, 128] and heights(int8, 128) == [64, 128]
    assert heights(fourbit, 2048) == heights(int8, 2048) == [128]


def test_launch_parameters_take_a_symbolic_m():
    """Under torch.compile with dynamic shapes the op bodies see M as a SymInt: picking the kernel,
    the split and the autotune bucket must not specialize on M (one guard, M <= 128, at most)."""
    from qpass.kernels.triton_4bit import _gemm_configs
    from qpass.kernels.triton_common import cdiv, m_bucket, prune_gemm_configs
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    m = env.create_symintnode(env.create_symbol(24, source=ConstantSource("M"), dynamic_dim=DimDynamic.DYNAMIC),
                              hint=24, source=ConstantSource("M"))
    assert not gemv_applies(m, 4096, 64, torch.empty(8, dtype=torch.uint8))
    assert gemm_split(m, 4096, 4096) == (8, 512)
    assert m_bucket(m) is m and m_bucket(24) == 32
    assert len(prune_gemm_configs(_gemm_configs(), {"M_BUCKET": m})) == len(_gemm_configs())
    tiles = cdiv(m, 16)  # a grid's row tiles stay symbolic: no guard
    assert isinstance(tiles, torch.SymInt) and tiles.node.hint == 2
    assert [str(guard.expr) for guard in env.guards] == [f"{m.node.expr} <= 128"]


def test_host_cdiv_is_tritons():
    """The launchers' grids and splits use triton_common.cdiv (triton.cdiv costs ~3 us a call on the host)."""
    from qpass.kernels.triton_common import cdiv

    pairs = [(a, b) for a in range(0, 300) for b in (1, 2, 3, 16, 64, 127, 128)] + [(28672 * 8192, 4096)]
    assert [cdiv(a, b) for a, b in pairs] == [triton.cdiv(a, b) for a, b in pairs]


@pytest.mark.parametrize("k, blocksize", [(256, 64), (100, 64), (41, 32)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_kernel_matches_the_reference(k, blocksize, dtype, double_quant, monkeypatch):
    """The dequantization pass is the reference's arithmetic: bit for bit (but for the interpreter's
    truncating bf16 cast, one bf16 ulp)."""
    config = qpass.NF4Config(blocksize=blocksize, double_quant=double_quant)
    layout, t = quantize_weight(torch.randn(19, k) * 0.05, config)
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    out = dequantize_4bit_triton(t["weight"], t["quant_map"], t["absmax"], t["nested_absmax"], t["nested_quant_map"],
                                 t["offset"], 19, k, blocksize, dtype)
    monkeypatch.setattr(ops, "use_triton", lambda x: False)  # the reference, on any device
    with torch.no_grad():
        ref = layout.dequantize(t, dtype)
    if dtype == torch.bfloat16 and INTERPRETED:
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, ref)


def test_large_m_dequantizes_once_then_multiplies(monkeypatch):
    """From DEQUANT_MATMUL_MIN_M rows on: dequantize, then a plain matmul (cuBLAS on a GPU)."""
    monkeypatch.setattr(triton_4bit, "DEQUANT_MATMUL_MIN_M", 8)
    calls = []
    original = triton_4bit.dequantize_4bit_triton
    monkeypatch.setattr(triton_4bit, "dequantize_4bit_triton", lambda *a, **kw: calls.append(a) or original(*a, **kw))
    layout, t = quantize_weight(torch.randn(24, 128) * 0.05, qpass.NF4Config(compute_dtype=torch.float16))
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(9, 24, 128, torch.float16)
    out = _4bit_call(layout, t, x, bias)
    assert len(calls) == 1
    op, args = layout.linear_call(x, t, bias)
    _check(out, x, layout, t, bias, _reference(op, args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("outlier_column", [None, 1500], ids=["no-outliers", "outlier"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_large_m_int8_product_from_int_mm(dtype, outlier_column, has_bias, monkeypatch):
    """From INT_MM_MIN_M rows on: torch._int_mm (cuBLAS on a GPU) multiplies, the GEMM kernel's epilogue
    adds scales, outlier columns and bias. Without outliers the epilogue and the fused kernel give the
    same bits."""
    monkeypatch.setattr(triton_int8, "INT_MM_MIN_M", 8)
    m, n, k = 24, 40, 2048
    calls = []
    original = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(a) or original(*a))
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.Int8Config(compute_dtype=dtype))
    t = {name: v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(m, n, k, dtype, outlier_column=outlier_column)
    bias = bias if has_bias else None
    out = linear_int8_triton(x, t["weight"], t["SCB"], bias, 6.0, dtype, autotune=False)
    assert len(calls) == 1
    op, args = layout.linear_call(x, t, bias)
    _check_int8(out, _reference(op, args), dtype)
    fused = linear_int8_triton(x, t["weight"], t["SCB"], bias, 6.0, dtype, config=triton_int8._gemm_configs()[0],
                               splits=1)  # one split: the int32 sum is scaled once, as in the epilogue
    assert len(calls) == 1  # an explicit config runs the fused kernel
    if outlier_column is None:
        assert torch.equal(out, fused)
    # below 17 rows (torch._int_mm's CUDA floor) or with N not a multiple of 8: the fused kernel
    assert not triton_int8.int_mm_applies(16, n, k) and not triton_int8.int_mm_applies(m, n + 1, k)


@pytest.mark.parametrize("m", [1, 5, 24])
def test_int8_many_outlier_columns(m, monkeypatch):
    """37 outlier columns spread over K: more than two of the GEMM's OUTLIER_BLOCK gathers, in both K
    splits (M = 1 and 5), through the fused kernel and (M = 24) the epilogue after torch._int_mm; M = 1
    takes the single-row mask. The compacted list holds exactly the mask's columns, in order."""
    monkeypatch.setattr(triton_int8, "INT_MM_MIN_M", 24)
    n, k = 24, 1024
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.Int8Config(compute_dtype=torch.float16))
    t = {name: v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(m, n, k, torch.float16)
    outliers = torch.randperm(k)[:37].sort().values.to(DEVICE)
    x[m // 2, outliers] = 10.0 * torch.randn(37, device=DEVICE).sign().to(x.dtype)
    quant = int8_vectorwise_quant_triton(x, 6.0)
    assert int(quant.outlier_count) >= 37 > 2 * triton_int8.OUTLIER_BLOCK
    assert torch.equal(quant.outlier_columns[: int(quant.outlier_count)].long(), quant.mask.nonzero().flatten())
    assert set(outliers.tolist()) <= set(quant.mask.nonzero().flatten().tolist())
    assert triton_int8.int_mm_applies(m, n, k) == (m == 24) and (m == 24 or gemm_split(m, n, k)[0] > 1)
    out = linear_int8_triton(x, t["weight"], t["SCB"], bias, 6.0, torch.float16, autotune=False)
    op, args = layout.linear_call(x, t, bias)
    _check_int8(out, _reference(op, args), torch.float16)


@pytest.mark.skipif(INTERPRETED, reason="autotuning times every config on a GPU")
@pytest.mark.parametrize("m", [1, 3, 16, 100, 300, 1500])
def test_autotuned_launches(m):
    """The launches the ops make (autotuned) on a Llama-like K and both formats' paths."""
    n, k = 384, 2048
    for config in (qpass.NF4Config(compute_dtype=torch.bfloat16), qpass.Int8Config(compute_dtype=torch.bfloat16)):
        layout, t = quantize_weight(torch.randn(n, k) * 0.05, config)
        t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
        x, bias = _inputs(m, n, k, torch.bfloat16, outlier_column=5)
        op, args = layout.linear_call(x, t, bias)
        if isinstance(config, qpass.NF4Config):
            out = _4bit_call(layout, t, x, bias, autotune=True)
            _check(out, x, layout, t, bias, _reference(op, args))
        else:
            out = linear_int8_triton(x, t["weight"], t["SCB"], bias, 6.0, torch.bfloat16, autotune=True)
            _check_int8(out, _reference(op, args), torch.bfloat16)


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_every_4bit_config_and_split_computes_the_layer(kernel):
    """Each autotune config of the 4-bit GEMV and GEMM, and split counts other than the heuristic's
    (what benchmarks/sweep_configs.py times), give the layer: the configs differ in tile shape and lane
    arrangement, and the interpreter would otherwise only ever run the first."""
    m = 1 if kernel == "gemv" else 20
    n, k = 40, 512  # N not a multiple of any tile
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.NF4Config(compute_dtype=torch.bfloat16))
    t = {name: None if v is None else v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(m, n, k, torch.bfloat16)
    assert gemv_applies(m, k, 64, t["weight"]) == (kernel == "gemv")
    op, args = layout.linear_call(x, t, bias)
    reference = _reference(op, args)
    configs = getattr(triton_4bit, f"_{kernel}_configs")()
    for config in configs:
        _check(_4bit_call(layout, t, x, bias, config=config), x, layout, t, bias, reference)
    for splits in (1, 3, 4):
        _check(_4bit_call(layout, t, x, bias, splits=splits), x, layout, t, bias, reference)
    other_kind = getattr(triton_4bit, f"_{'gemm' if kernel == 'gemv' else 'gemv'}_configs")()[0]
    with pytest.raises(ValueError, match=f"4-bit {kernel.upper()} takes configs"):
        _4bit_call(layout, t, x, bias, config=other_kind)


def test_every_int8_config_and_split_computes_the_layer():
    """Each autotune config of the int8 GEMM and split counts other than the heuristic's (what
    benchmarks/sweep_configs.py times) give the layer, outlier columns included."""
    m, n, k = 20, 40, 512
    layout, t = quantize_weight(torch.randn(n, k) * 0.05, qpass.Int8Config(compute_dtype=torch.bfloat16))
    t = {name: v.to(DEVICE) for name, v in t.items()}
    x, bias = _inputs(m, n, k, torch.bfloat16, outlier_column=300)
    op, args = layout.linear_call(x, t, bias)
    reference = _reference(op, args)
    runs = [dict(config=config) for config in triton_int8._gemm_configs()] + [dict(splits=s) for s in (1, 3, 4)]
    for overrides in runs:
        out = linear_int8_triton(x, t["weight"], t["SCB"], bias, 6.0, torch.bfloat16, autotune=False, **overrides)
        _check_int8(out, reference, torch.bfloat16, overrides)
    with pytest.raises(ValueError, match="int8 GEMM takes configs"):
        linear_int8_triton(x, t["weight"], t["SCB"], bias, 6.0, torch.bfloat16, config=triton_4bit._gemv_configs()[0])


@triton.jit
def _round_kernel(v_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _round_half_even(tl.load(v_ptr + i)))


def test_round_half_even_matches_torch_round():
    """The int8 kernels' rounding against torch.round: ties to even, and the floats next to ties."""
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item()
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, below_half, -below_half, 1.4999999, 126.5, 127.0, -126.5,
                      0.0, -0.0, 3.7, -3.7], device=DEVICE)
    out = torch.empty_like(v)
    _round_kernel[(1,)](v, out, BLOCK=v.numel())
    assert torch.equal(out, torch.round(v))
