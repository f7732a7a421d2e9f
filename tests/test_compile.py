"""torch.compile of quantized models: no graph breaks, same numbers as eager."""

import pytest
import torch

import qpass

from models import COMPILE_VS_EAGER_BF16, relative_error, tiny_llama


@pytest.mark.parametrize("spec", ["nf4", "fp4", "int8"])
def test_compiled_llama_matches_eager(spec):
    model = qpass.quantize(tiny_llama(), spec)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
        out = compiled(ids, use_cache=False).logits
    assert relative_error(out, eager) < COMPILE_VS_EAGER_BF16


def test_compiled_training_step_through_quantized_layers():
    """AOTAutograd traces the ops' autograd formulas: backward through a compiled quantized layer (whose
    forward, 8 rows, is the fused reduction)."""
    layer = qpass.quantize(torch.nn.Linear(64, 16), qpass.NF4Config(compute_dtype=torch.float32))
    x = torch.randn(8, 64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).sum().backward()
    expected = torch.ones(8, 16) @ layer.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_compile_counts_no_graph_breaks():
    model = qpass.quantize(tiny_llama(), "nf4")
    ids = torch.randint(0, 128, (1, 8))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids, use_cache=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_4bit_linear_of_few_rows_decodes_inside_its_reduction(compute_dtype, monkeypatch):
    """On CPU, compiled, up to FUSED_DEQUANT_MAX_M rows and FUSED_DEQUANT_MAX_WEIGHTS weights: no matmul and
    no weight written, the decoding fused into the reduction (ref4.linear_4bit_rows), with eager's numbers
    up to summation order (and, in bf16, the rounding Inductor does not emulate). More rows, a larger
    weight, or blocks that cross rows: a call to qpass::linear_4bit_cpu, eager's own path, bit for bit."""
    from torch._inductor.utils import run_and_get_code

    from qpass.kernels import ops

    monkeypatch.setattr(ops, "FUSED_DEQUANT_MAX_WEIGHTS", 48 * 256)
    config = qpass.NF4Config(compute_dtype=compute_dtype)
    cases = [(256, 48, 1, True), (256, 48, ops.FUSED_DEQUANT_MAX_M, True),
             (256, 48, ops.FUSED_DEQUANT_MAX_M + 1, False), (256, 49, 1, False),
             (96, 48, 1, False)]  # 96 inputs: 64-weight blocks cross rows
    for in_features, out_features, rows, fused in cases:
        layer = qpass.quantize(torch.nn.Linear(in_features, out_features), config)
        x = torch.randn(rows, in_features)
        torch._dynamo.reset()
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
            eager = layer(x)
        code = "".join(code)
        calls_cpu_op = "qpass.linear_4bit_cpu" in code
        assert calls_cpu_op != fused and "extern_kernels.mm" not in code, (in_features, out_features, rows)
        if fused:
            assert relative_error(out, eager) < (1e-6 if compute_dtype == torch.float32 else COMPILE_VS_EAGER_BF16)
        else:
            assert torch.equal(out, eager)


def test_op_bodies_know_they_are_traced_from_fake_tensors_alone():
    """torch 2.11 traces a triton_op's body for Inductor with fake tensors and is_compiling() False (2.13
    sets it): the fused 4-bit path must still be chosen there, and never for real tensors run eagerly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qpass.kernels import ops

    real = torch.randn(1, 64)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        assert not torch.compiler.is_compiling()
        assert ops._traced(fake) and ops._fuse_dequantization(fake, 32, 64, 64)
    assert not ops._traced(real) and not ops._fuse_dequantization(real, 32, 64, 64)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_int8_linear_on_cpu_runs_the_eager_path(compute_dtype):
    """On CPU, compiled, the int8 linear calls qpass::linear_int8_cpu as it is (the outlier columns
    gathered, which Inductor cannot trace): the generated code holds no matmul of its own, and the output
    is eager's, bit for bit, with outlier columns present and absent; a training step goes through it."""
    from torch._inductor.utils import run_and_get_code

    layer = qpass.quantize(torch.nn.Linear(64, 24), qpass.Int8Config(compute_dtype=compute_dtype))
    for outliers in (True, False):
        x = torch.randn(5, 64)
        if outliers:
            x[:, 7] *= 40
        torch._dynamo.reset()
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
            eager = layer(x)
        assert "qpass.linear_int8_cpu" in "".join(code) and "extern_kernels.mm" not in "".join(code)
        assert torch.equal(out, eager)
    x = torch.randn(5, 64, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True)(x).sum().backward()
    compiled_grad, x.grad = x.grad, None
    layer(x).sum().backward()
    assert relative_error(compiled_grad, x.grad) < (1e-6 if compute_dtype == torch.float32 else COMPILE_VS_EAGER_BF16)
