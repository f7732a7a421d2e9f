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
    """AOTAutograd traces the ops' autograd formulas: backward through a compiled quantized layer."""
    layer = qpass.quantize(torch.nn.Linear(32, 16), qpass.NF4Config(compute_dtype=torch.float32))
    x = torch.randn(8, 32, requires_grad=True)
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
