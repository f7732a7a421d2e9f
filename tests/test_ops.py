"""The torch.ops.qpass ops: schema/fake/autograd registration, numerics, and awkward inputs."""

import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

import qpass
from qpass.formats import quantize_weight

CONFIGS = {
    "nf4": qpass.NF4Config(),
    "fp4": qpass.FP4Config(double_quant=False),
    "nf4-fp32": qpass.NF4Config(compute_dtype=torch.float32, blocksize=32),
    "int8": qpass.Int8Config(),
    "int8-no-outliers": qpass.Int8Config(threshold=0.0),
}


def _layer(config, out_features=48, in_features=80, bias=True):
    w = torch.randn(out_features, in_features) * 0.05
    layout, tensors = quantize_weight(w, config)
    b = torch.randn(out_features) * 0.1 if bias else None
    return w, layout, tensors, b


def _call(layout, tensors, x, bias):
    op, args = layout.linear_call(x, tensors, bias)
    return op(*args)


@pytest.mark.parametrize("name", CONFIGS)
def test_opcheck(name):
    """Schema, fake kernel, autograd registration and AOT dispatch all agree with the real kernel."""
    _, layout, tensors, b = _layer(CONFIGS[name])
    x = torch.randn(5, 80, requires_grad=True)
    op, args = layout.linear_call(x, tensors, b.requires_grad_())
    torch.library.opcheck(op, args)


def test_opcheck_quantize_ops():
    w = torch.randn(33, 65)
    torch.library.opcheck(torch.ops.qpass.quantize_4bit.default, (w, 64, "nf4"))
    torch.library.opcheck(torch.ops.qpass.quantize_blockwise_8bit.default,
                          (w.reshape(-1), qpass.kernels.codebooks.dynamic_code(), 256))
    torch.library.opcheck(torch.ops.qpass.int8_vectorwise_quant.default, (w, 6.0))


@pytest.mark.parametrize("name", CONFIGS)
def test_linear_matches_dequantized_weight(name):
    config = CONFIGS[name]
    _, layout, tensors, b = _layer(config)
    x = torch.randn(7, 80, dtype=torch.float32)
    out = _call(layout, tensors, x, b)
    weight = layout.dequantize(tensors, torch.float64)
    ref = x.double() @ weight.T + b.double()
    rel = (out.double() - ref).norm() / ref.norm()
    # bf16 compute: a few bf16 ulps; int8: activation rounding to 1/127 of the row absmax
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[config.compute_dtype]
    if isinstance(config, qpass.Int8Config):
        tolerance = 2e-2
    assert rel < tolerance, rel
    assert out.dtype == x.dtype and not out.isnan().any()


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_the_input_and_bias(name):
    _, layout, tensors, b = _layer(CONFIGS[name])
    x = torch.randn(4, 3, 80, requires_grad=True)
    bias = b.clone().requires_grad_()
    out = _call(layout, tensors, x, bias)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    weight = layout.dequantize(tensors, torch.float32)
    expected_x = grad_out @ weight.to(layout.config.compute_dtype).float()
    assert x.grad.dtype == x.dtype and bias.grad.dtype == bias.dtype
    torch.testing.assert_close(x.grad, expected_x, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bias.grad, grad_out.sum((0, 1)))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_awkward_inputs(name, dtype):
    """Other input dtypes, 3-D inputs, empty batches and non-contiguous inputs all work."""
    _, layout, tensors, b = _layer(CONFIGS[name])
    x3 = torch.randn(2, 5, 80).to(dtype)
    out3 = _call(layout, tensors, x3, b)
    assert out3.shape == (2, 5, 48) and out3.dtype == dtype
    flat = _call(layout, tensors, x3.reshape(10, 80), b)
    torch.testing.assert_close(out3.reshape(10, 48), flat)
    empty = _call(layout, tensors, torch.randn(0, 80).to(dtype), b)
    assert empty.shape == (0, 48)
    wide = torch.randn(80, 10).to(dtype)
    non_contiguous = wide.T  # [10, 80], strides (1, 10)
    assert not non_contiguous.is_contiguous()
    torch.testing.assert_close(_call(layout, tensors, non_contiguous, b),
                               _call(layout, tensors, non_contiguous.contiguous(), b))


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_row_decoder_gives_the_rounded_dequantized_rows(blocksize, double_quant, dtype):
    """Each block of rows RowDecoder4bit gives is the reference dequantization rounded to the compute
    dtype, bit for bit, including blocks that cross rows (37 inputs) and a last short block."""
    from qpass.kernels import ops
    from qpass.kernels import reference_4bit as ref4

    for out_features, in_features in ((48, 80), (70, 37), (7, 128)):
        config = qpass.NF4Config(blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype)
        layout, t = quantize_weight(torch.randn(out_features, in_features), config)
        expected = layout.dequantize(t, dtype).float()
        scales = ref4.block_absmax(t["absmax"], t.get("nested_absmax"), t.get("nested_quant_map"), t.get("offset"),
                                   ops.DOUBLE_QUANT_BLOCKSIZE)
        decoder = ref4.RowDecoder4bit(t["weight"], t["quant_map"], scales, out_features, in_features, blocksize,
                                      dtype, block_weights=300)
        starts = range(0, out_features, decoder.row_step)
        assert decoder.row_step * in_features % blocksize == 0 or decoder.row_step == out_features
        assert blocksize == 4096 or len(starts) > 1
        for start in starts:
            stop = min(start + decoder.row_step, out_features)
            assert torch.equal(decoder(start, stop), expected[start:stop]), (out_features, in_features, start)


@pytest.mark.parametrize("name", ["nf4", "fp4", "nf4-fp32"])
def test_cpu_path_decodes_a_large_weight_by_blocks_of_rows(name, monkeypatch):
    """Eagerly on the CPU, a weight of more than BLOCK_WEIGHTS weights is decoded a block of rows at a time
    (forward and input gradient) and never whole: the same sums as multiplying by the whole dequantized
    weight, up to float32 summation order, then one rounding to the compute dtype."""
    from qpass.kernels import ops
    from qpass.kernels import reference_4bit as ref4

    config = CONFIGS[name]
    dtype = config.compute_dtype
    layers = []
    for out_features, in_features in ((48, 80), (70, 37)):  # 37 inputs: blocks cross rows
        w, layout, tensors, b = _layer(config, out_features, in_features)
        layers.append((layout, tensors, b, layout.dequantize(tensors, dtype).float()))
    monkeypatch.setattr(ops, "BLOCK_WEIGHTS", 512)
    calls = []
    decode = ref4.RowDecoder4bit.__call__
    monkeypatch.setattr(ref4.RowDecoder4bit, "__call__", lambda self, *a: calls.append(a) or decode(self, *a))
    monkeypatch.setattr(ref4, "dequantize_4bit", lambda *a: pytest.fail("decoded the whole weight"))
    for layout, tensors, b, weight in layers:
        out_features, in_features = weight.shape
        # float32 sums in another order (at most max(in, out) roundings each), then one rounding
        bound = torch.finfo(dtype).eps + max(in_features, out_features) * torch.finfo(torch.float32).eps
        for rows in (0, 1, 7):
            calls.clear()
            x = torch.randn(2, rows, in_features, requires_grad=True)
            out = _call(layout, tensors, x, b)
            assert len(calls) > 1 and out.shape == (2, rows, out_features)
            grad_out = torch.randn_like(out)
            out.backward(grad_out)
            assert len(calls) > 2  # the backward decoded too
            x_r, g_r = x.detach().to(dtype).float(), grad_out.to(dtype).float()
            expected = (x_r @ weight.T + b.to(dtype).float()).to(dtype)
            assert ((out.float() - expected.float()).abs() <= bound * (x_r.abs() @ weight.abs().T + b.abs())).all()
            expected_grad = (g_r @ weight).to(dtype)
            assert ((x.grad.float() - expected_grad.float()).abs() <= bound * (g_r.abs() @ weight.abs())).all()


@pytest.mark.parametrize("name", ["nf4", "fp4", "nf4-fp32", "nf4-fp16-storage", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_eager_cpu_dequantization_of_a_large_weight_goes_by_blocks_of_rows(name, dtype, monkeypatch):
    """Eagerly on the CPU, the dequantize ops decode a weight of more than BLOCK_WEIGHTS weights a block of
    rows at a time into the result, never through the whole-weight reference: the reference's bits,
    blocks that cross rows (37 or 38 inputs) and a short last block of rows included. Traced, the op keeps the
    whole-weight reference, which Inductor fuses into its consumer."""
    from qpass.kernels import ops
    from qpass.kernels import reference_4bit as ref4
    from qpass.kernels import reference_int8 as ref8

    config = CONFIGS.get(name) or qpass.NF4Config(quant_storage=torch.float16)
    decoder = ref8.RowDecoderInt8 if isinstance(config, qpass.Int8Config) else ref4.RowDecoder4bit
    whole = (ref8, "dequantize_int8") if decoder is ref8.RowDecoderInt8 else (ref4, "dequantize_4bit")
    odd = 38 if name.endswith("storage") else 37  # fp16 storage needs an even number of packed bytes
    for out_features, in_features in ((48, 80), (70, odd)):
        _, layout, tensors, _ = _layer(config, out_features, in_features, bias=False)
        expected = layout.dequantize(tensors, dtype)  # one block: the whole-weight reference
        with monkeypatch.context() as patch:
            patch.setattr(ops, "BLOCK_WEIGHTS", 512)
            calls = []
            decode = decoder.__call__
            patch.setattr(decoder, "__call__", lambda self, *a: calls.append(a) or decode(self, *a))
            patch.setattr(*whole, lambda *a: pytest.fail("decoded the whole weight"))
            blocked = layout.dequantize(tensors, dtype)
            assert len(calls) > 1 and calls[-1][1] == out_features
            assert blocked.dtype == dtype and blocked.shape == (out_features, in_features)
            assert torch.equal(blocked, expected), (out_features, in_features)
            with pytest.raises(pytest.fail.Exception, match="decoded the whole weight"):
                torch.compile(lambda t: layout.dequantize(t, dtype), backend="aot_eager")(tensors)


def test_int8_matmul_is_exact_over_blocks_of_rows(monkeypatch):
    """int8_matmul_exact multiplies the weight a block of rows at a time, in float32 chunks of k: the
    result is the exact integer product, also where k is past the chunk (whose float32 sums would no
    longer be exact in one piece) and the last block of rows is short."""
    from qpass.kernels import reference_int8 as ref8

    generator = torch.Generator().manual_seed(5)
    monkeypatch.setattr(ref8, "BLOCK_WEIGHTS", 7 * 2100)  # 7 rows a block: 45 rows -> 7 blocks, the last of 3
    a = torch.randint(-127, 128, (6, 2100), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (45, 2100), dtype=torch.int8, generator=generator)
    # Row 0 of each: sums of up to 2100 * 127² = 33.9M with odd terms, past float32's 2^24 of exact integers.
    a[0] = 127
    b[0] = torch.randint(121, 128, (2100,), dtype=torch.int8, generator=generator)
    calls = []
    decode = ref8.RowDecoderInt8.__call__
    monkeypatch.setattr(ref8.RowDecoderInt8, "__call__", lambda self, *a: calls.append(a) or decode(self, *a))
    out = ref8.int8_matmul_exact(a, b)
    assert out.dtype == torch.int32 and len(calls) == 7
    assert torch.equal(out, (a.long() @ b.long().T).int())
    assert out[0, 0] == 127 * b[0].long().sum() > 2**24
    calls.clear()  # off the CPU, a block is as many codes as 1024 columns of every row: 45 * 1024 // 2100 = 21 rows
    assert ref8.int8_matmul_exact(a.to("meta"), b.to("meta")).shape == (6, 45) and len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_row_decoder_gives_the_rounded_dequantized_rows(dtype):
    """Each block of rows RowDecoderInt8 gives is dequantize_int8 (CB * SCB / 127 in the compute dtype)
    as float32, bit for bit, the last block short."""
    from qpass.kernels import reference_int8 as ref8

    layout, t = quantize_weight(torch.randn(50, 80), qpass.Int8Config(compute_dtype=dtype))
    expected = ref8.dequantize_int8(t["weight"], t["SCB"], dtype).float()
    decoder = ref8.RowDecoderInt8(t["weight"], t["SCB"], dtype, block_weights=12 * 80)
    assert decoder.row_step == 12
    for start in range(0, 50, decoder.row_step):
        stop = min(start + decoder.row_step, 50)
        assert torch.equal(decoder(start, stop), expected[start:stop]), start


@pytest.mark.parametrize("name", ["int8", "int8-no-outliers"])
def test_int8_cpu_backward_decodes_a_large_weight_by_blocks_of_rows(name, monkeypatch):
    """Eagerly on the CPU, the input gradient of an int8 layer of more than BLOCK_WEIGHTS weights is
    computed a block of dequantized rows at a time, never from the whole dequantized weight: the same
    sums up to float32 summation order, then one rounding to the compute dtype."""
    from qpass.kernels import ops
    from qpass.kernels import reference_int8 as ref8

    config = CONFIGS[name]
    dtype = config.compute_dtype
    _, layout, tensors, b = _layer(config, 70, 37)
    weight = layout.dequantize(tensors, dtype).float()
    monkeypatch.setattr(ops, "BLOCK_WEIGHTS", 512)
    monkeypatch.setattr(ops.torch.ops.qpass, "dequantize_int8",
                        lambda *a: pytest.fail("dequantized the whole weight"), raising=False)
    dequantized_blocks = []  # blocks of CB * SCB / 127; the forward's exact matmul decodes CB alone
    decode = ref8.RowDecoderInt8.__call__

    def record(self, start, stop):
        if self._scales is not None:
            dequantized_blocks.append((start, stop))
        return decode(self, start, stop)

    monkeypatch.setattr(ref8.RowDecoderInt8, "__call__", record)
    bound = torch.finfo(dtype).eps + 70 * torch.finfo(torch.float32).eps
    for rows in (0, 1, 7):
        dequantized_blocks.clear()
        x = torch.randn(2, rows, 37, requires_grad=True)
        out = _call(layout, tensors, x, b)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        assert len(dequantized_blocks) == 6  # 512 // 37 = 13 rows a block: 70 rows in 6 blocks
        g_r = grad_out.to(dtype).float()
        expected_grad = (g_r @ weight).to(dtype)
        assert ((x.grad.float() - expected_grad.float()).abs() <= bound * (g_r.abs() @ weight.abs())).all()


def test_wrong_input_width_names_the_shape():
    _, layout, tensors, b = _layer(CONFIGS["nf4"])
    with pytest.raises(RuntimeError, match=r"in_features=80"):
        _call(layout, tensors, torch.randn(3, 81), b)


def test_kernels_run_on_nvidia_gpus_only(monkeypatch):
    """The Triton kernels (inline PTX) for CUDA tensors; the reference on CPU and on ROCm, whose GPUs torch
    also calls "cuda"."""
    from qpass.kernels import ops
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        gpu_tensor = torch.empty(2, device="cuda")  # a fake one: no GPU needed
    assert ops.use_triton(gpu_tensor) == ops.HAS_TRITON and not ops.use_triton(torch.empty(2))
    monkeypatch.setattr(ops, "ON_ROCM", True)
    assert not ops.use_triton(gpu_tensor)


def test_without_triton_qpass_imports_quietly_and_runs_the_reference():
    """Triton is optional (Linux x86-64 only in the test extra): without it, importing qpass prints nothing
    (torch logs a warning per triton_op it registers) and the ops run on CPU."""
    code = ("import sys; sys.modules['triton'] = None\n"  # import triton now fails, find_spec gives None
            "import torch, qpass\n"
            "from qpass.kernels import ops\n"
            "assert not ops.HAS_TRITON\n"
            "layer = qpass.quantize(torch.nn.Linear(64, 32), 'nf4')\n"
            "print(tuple(layer(torch.randn(3, 64)).shape))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "(3, 32)\n" and out.stderr == ""


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_linear_matches_bitsandbytes(threshold):
    """qpass' int8 linear against bitsandbytes' own Linear8bitLt on the same weights, with outliers."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 64).half()
    ref = bnb.nn.Linear8bitLt(256, 64, has_fp16_weights=False, threshold=threshold)
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")
    ref.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                   has_fp16_weights=False)._quantize("cpu")
    ref.bias = torch.nn.Parameter(linear.bias.data.clone())
    ref.eval()  # in training mode bitsandbytes runs a dequantize-then-matmul path on CPU, not LLM.int8()
    x = torch.randn(9, 256, dtype=torch.float16)
    x[:, 17] *= 40  # an outlier column
    x[4, 100] = -12.0
    layout, tensors = quantize_weight(linear.weight.data,
                                      qpass.Int8Config(threshold=threshold, compute_dtype=torch.float16))
    assert torch.equal(tensors["weight"], ref.weight.data)
    ours = _call(layout, tensors, x, linear.bias.data)
    theirs = ref(x)
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    torch.testing.assert_close(ours, theirs, rtol=3e-3, atol=3e-3)
    ours_err = (ours.double() - exact).norm() / exact.norm()
    theirs_err = (theirs.double() - exact).norm() / exact.norm()
    assert ours_err <= theirs_err * 1.05 + 1e-4
    if threshold:
        with_outliers = ours
        plain_layout, _ = quantize_weight(linear.weight.data,
                                          qpass.Int8Config(threshold=0.0, compute_dtype=torch.float16))
        without = _call(plain_layout, tensors, x, linear.bias.data)
        # the outlier path is what keeps the error small when a column is 40x larger
        assert (with_outliers.double() - exact).norm() < (without.double() - exact).norm()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_linear_matches_bitsandbytes(quant_type):
    torch.manual_seed(2)
    linear = torch.nn.Linear(128, 96, dtype=torch.bfloat16)
    ref = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type=quant_type)
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")  # bitsandbytes quantizes on the move
    ref.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type=quant_type
    )._quantize("cpu")
    ref.eval()
    config = (qpass.NF4Config if quant_type == "nf4" else qpass.FP4Config)(compute_dtype=torch.bfloat16)
    layout, tensors = quantize_weight(linear.weight.data, config)
    assert torch.equal(tensors["weight"], ref.weight.data)
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(_call(layout, tensors, x, linear.bias.data), ref(x), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outlier_columns", [(), (3,), (0, 17, 63), tuple(range(64))])
def test_int8_outlier_term_gathered_equals_masked(compute_dtype, outlier_columns):
    """The eager CPU path gathers the outlier columns of x and CB; the definition masks x and dequantizes
    all of CB. The same products, in another summation order: equal up to float32 rounding before the
    single rounding to the compute dtype."""
    from qpass.kernels import reference_int8 as ref8

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 64, generator=generator)
    layout, tensors = quantize_weight(weight, qpass.Int8Config(compute_dtype=compute_dtype))
    x = torch.randn(5, 64, generator=generator)
    x[:, list(outlier_columns)] *= 30
    x[:, list(outlier_columns)] += 10
    bias = torch.randn(40, generator=generator)
    for b in (bias, None):
        masked = ref8.linear_int8(x, tensors["weight"], tensors["SCB"], b, 6.0, compute_dtype)
        gathered = ref8.linear_int8(x, tensors["weight"], tensors["SCB"], b, 6.0, compute_dtype, gather_outliers=True)
        assert ref8.int8_vectorwise_quant(x.to(compute_dtype), 6.0)[2].sum() == len(outlier_columns)
        ulp = torch.finfo(compute_dtype).eps
        torch.testing.assert_close(gathered.float(), masked.float(), rtol=ulp, atol=1e-5)


@pytest.mark.parametrize("spec", ["int8", "nf4"])
def test_linear_layers_trace_under_fake_tensors(spec):
    """A layer called on fake tensors (what tracing tools run: FakeTensorMode, flop counters) takes the
    ops' fake kernels: no data-dependent shape escapes, even where the CPU path gathers outlier columns."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = qpass.quantize(torch.nn.Linear(64, 24), spec)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = layer(torch.randn(5, 64))
    assert out.shape == (5, 24) and out.dtype == torch.float32


def test_int8_ops_have_no_data_dependent_shapes():
    """The int8 linear exports with outliers handled inside the op: no guards on outlier counts."""
    _, layout, tensors, b = _layer(CONFIGS["int8"])

    class M(torch.nn.Module):
        def forward(self, x):
            return _call(layout, tensors, x, b)

    batch = torch.export.Dim("batch")
    ep = torch.export.export(M(), (torch.randn(3, 80),), dynamic_shapes=({0: batch},))
    x = torch.randn(6, 80)
    x[:, 2] = 20.0
    torch.testing.assert_close(ep.module()(x), M()(x))
