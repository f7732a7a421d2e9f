"""ONNX export (qpass.export_onnx): 4-bit layers as com.microsoft.MatMulBnb4, int8 layers as standard ONNX
operators, run by ONNX Runtime (CPU) against the qpass ops' own outputs."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import qpass
from qpass.integrations import onnx as qpass_onnx
from qpass.integrations.onnx_causal_lm import CausalLMLogits

from models import ONNX_INT8_MODEL, relative_error, tiny_llama

F32 = torch.float32
# MatMulBnb4 dequantizes the same bytes to the same float32 weights as the reference; only the GEMM's
# summation order differs (measured: 1e-7 relative).
FLOAT32_SUM_ORDER = 1e-6


def _run(path, *inputs, fuse=True):
    """ONNX Runtime's outputs; ``fuse=False`` runs the graph op by op as written (no fusions such as
    MatMulInteger + Cast + Mul into MatMulIntegerToFloat, which scales in another float32 order)."""
    options = onnxruntime.SessionOptions()
    if not fuse:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feed)[0])


def _op_types(program):
    return Counter(node.op_type for node in program.model.graph)


def _two_layers(config, bias=True):
    model = nn.Sequential(nn.Linear(64, 96, bias=bias), nn.ReLU(), nn.Linear(96, 40)).eval()
    return qpass.quantize(model, config)


def _inputs(*shape, dtype=F32, outlier_column=3):
    x = torch.randn(*shape)
    x[..., outlier_column] *= 20  # |x| >= 6: an LLM.int8() outlier column
    return x.to(dtype)


def _tie_row(features=64):
    """A row on which torch's ``127.0 / absmax`` (``absmax.reciprocal() * 127``: two roundings, the
    reference's scale) and a division rounded once quantize an entry differently: the entry lands on a
    .5 tie under one scale and not under the other, so rounding half to even tells them apart."""
    for absmax in torch.linspace(1.0, 5.0, 20000):  # below the outlier threshold
        once = torch.tensor(127.0 / absmax.item(), dtype=F32)
        twice = absmax.reciprocal() * 127
        value = -63.5 / once
        if once != twice and value * once == -63.5 and value * twice != -63.5:
            row = torch.zeros(features)
            row[0], row[1] = absmax, value
            return row
    raise AssertionError("no tie found")


FOUR_BIT = [
    qpass.NF4Config(compute_dtype=F32),
    qpass.NF4Config(compute_dtype=F32, double_quant=False, blocksize=128),
    qpass.FP4Config(compute_dtype=F32),
    qpass.FP4Config(compute_dtype=F32, double_quant=False, blocksize=32),
]


@pytest.mark.parametrize("config", FOUR_BIT, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_4bit_layers_become_matmul_bnb4_with_the_ops_outputs(tmp_path, config, bias):
    model = _two_layers(config, bias)
    x = _inputs(2, 5, 64)
    program = qpass.export_onnx(model, (x,), tmp_path / "m.onnx")
    ops = _op_types(program)
    assert ops["MatMulBnb4"] == 2 and ops["MatMul"] == 0  # no weight was dequantized into a float MatMul
    got = _run(tmp_path / "m.onnx", x)
    want = model(x)
    assert got.shape == want.shape == (2, 5, 40)
    assert relative_error(got, want) < FLOAT32_SUM_ORDER


def test_the_file_keeps_the_bitsandbytes_bytes(tmp_path):
    """B of MatMulBnb4 is the packed weight, byte for byte; absmax the decoded double-quantized scales."""
    model = _two_layers(qpass.NF4Config(compute_dtype=F32))
    program = qpass.export_onnx(model, (torch.randn(1, 64),), optimize=True)  # constants folded into B, absmax
    node = next(n for n in program.model.graph if n.op_type == "MatMulBnb4")
    codes, scales = (node.inputs[i].const_value.numpy() for i in (1, 2))
    layer = model[0]
    assert codes.dtype == np.uint8 and np.array_equal(codes, layer.weight.reshape(-1).numpy())
    assert {a.name: a.value for a in node.attributes.values()} == {
        "K": 64, "N": 96, "block_size": 64, "quant_type": qpass_onnx.MATMUL_BNB4_QUANT_TYPES["nf4"]}
    absmax = qpass.kernels.reference_4bit.block_absmax(layer.absmax, layer.nested_absmax, layer.nested_quant_map,
                                                      layer.offset, 256)
    assert np.array_equal(scales, absmax.numpy())  # the same float32 values, not merely close


@pytest.mark.parametrize("compute_dtype", [F32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_layers_are_the_reference_arithmetic(tmp_path, compute_dtype, threshold, bias):
    config = qpass.Int8Config(threshold=threshold, compute_dtype=compute_dtype)
    model = qpass.quantize(nn.Sequential(nn.Linear(64, 96, bias=bias)).eval(), config, skip_modules=[])
    x = _inputs(3, 7, 64)
    x[1, 2] = _tie_row()
    assert int((x.abs() >= 6).reshape(-1, 64).any(0).sum()) == 1
    program = qpass.export_onnx(model, (x,), tmp_path / "m.onnx")
    ops = _op_types(program)
    assert ops["MatMulInteger"] == 1 and ops["NonZero"] == (1 if threshold else 0)
    want = model(x)
    # Rounding for rounding the reference's steps: the int8 product is exact, and with one outlier column
    # the outlier term has no summation order to differ in (more columns: the next test).
    assert torch.equal(_run(tmp_path / "m.onnx", x, fuse=False), want)
    # ONNX Runtime's default fusions multiply the scales in another order: float32 rounding, and in bf16
    # an output may round to the neighbouring value (one bf16 step is 2**-8 relative).
    tolerance = FLOAT32_SUM_ORDER if compute_dtype == F32 else 2**-8
    assert relative_error(_run(tmp_path / "m.onnx", x), want) < tolerance


def test_int8_outlier_columns_may_change_from_call_to_call(tmp_path):
    model = _two_layers(qpass.Int8Config(compute_dtype=F32))
    qpass.export_onnx(model, (_inputs(2, 64),), tmp_path / "m.onnx")
    for x in (_inputs(2, 64, outlier_column=5), torch.randn(2, 64), _inputs(2, 64) * 3):
        outliers = int((x.abs() >= 6).any(0).sum())
        got = _run(tmp_path / "m.onnx", x)
        assert relative_error(got, model(x)) < FLOAT32_SUM_ORDER, outliers
        assert not got.isnan().any()


def test_half_precision_inputs_come_back_in_their_dtype(tmp_path):
    plan = qpass.QPassConfig(qpass.NF4Config(compute_dtype=F32), overrides={"2": qpass.Int8Config(compute_dtype=F32)})
    model = _two_layers(plan).half()
    x = _inputs(4, 64, dtype=torch.float16)
    qpass.export_onnx(model, (x,), tmp_path / "m.onnx")
    got = _run(tmp_path / "m.onnx", x)
    assert got.dtype == torch.float16
    assert relative_error(got, model(x)) < 1e-3  # float16 outputs; one rounding may differ


def test_16_bit_compute_keeps_the_layers_dtype_in_the_graph():
    """ONNX Runtime runs MatMulBnb4 in bf16/fp16 on its CUDA provider only (CPU: float32), so this checks the
    graph: A and absmax in the compute dtype, as the layer computes."""
    model = _two_layers(qpass.NF4Config(compute_dtype=torch.bfloat16))
    program = qpass.export_onnx(model, (torch.randn(2, 64),), optimize=True)  # its type inference names the dtypes
    node = next(n for n in program.model.graph if n.op_type == "MatMulBnb4")
    assert [str(node.inputs[i].dtype) for i in (0, 1, 2)] == ["BFLOAT16", "UINT8", "BFLOAT16"]
    assert program.model.graph.outputs[0].dtype.name == "FLOAT"  # cast back to the input's dtype


def test_exported_program_front_end_gives_the_same_model(tmp_path):
    torch.manual_seed(0)
    fp_model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40)).eval()
    x = _inputs(2, 64)
    plan = qpass.QPassConfig(qpass.NF4Config(compute_dtype=F32), overrides={"2": qpass.Int8Config(compute_dtype=F32)},
                             skip_modules=[])
    ep = qpass.quantize(torch.export.export(fp_model, (x,)), plan)
    qpass.export_onnx(ep, (x,), tmp_path / "ep.onnx")
    module = qpass.quantize(fp_model, plan)
    qpass.export_onnx(module, (x,), tmp_path / "module.onnx")
    from_ep, from_module = _run(tmp_path / "ep.onnx", x), _run(tmp_path / "module.onnx", x)
    assert torch.equal(from_ep, from_module)
    assert relative_error(from_ep, ep.module()(x)) < FLOAT32_SUM_ORDER


def test_quant_storage_bytes_are_exported_as_uint8_and_the_module_is_left_as_it_was(tmp_path):
    model = _two_layers(qpass.NF4Config(compute_dtype=F32, quant_storage=torch.bfloat16))
    x = torch.randn(2, 64)
    qpass.export_onnx(model, (x,), tmp_path / "m.onnx")
    assert model[0].weight.dtype == torch.bfloat16  # restored after the export
    assert relative_error(_run(tmp_path / "m.onnx", x), model(x)) < FLOAT32_SUM_ORDER


def test_exported_program_with_another_quant_storage_is_refused_with_advice():
    fp_model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = torch.randn(2, 64)
    ep = qpass.quantize(torch.export.export(fp_model, (x,)), qpass.NF4Config(quant_storage=torch.bfloat16),
                        skip_modules=[])
    with pytest.raises(Exception, match="quant_storage=torch.uint8"):
        qpass.export_onnx(ep, (x,))


def test_a_code_book_matmul_bnb4_does_not_have_is_refused_naming_the_layer(tmp_path):
    model = _two_layers(qpass.NF4Config(compute_dtype=F32))
    other = model[2].quant_map.clone()
    other[0] = -0.9
    model[2].quant_map = other
    with pytest.raises(ValueError, match=r"layer '2': its 4-bit code book \(quant_map\) is not bitsandbytes' NF4"):
        qpass.export_onnx(model, (torch.randn(2, 64),), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # nothing written


def test_torchscript_exporter_is_refused():
    with pytest.raises(ValueError, match="dynamo exporter"):
        qpass.export_onnx(_two_layers("nf4"), (torch.randn(2, 64),), dynamo=False)


@pytest.mark.parametrize("debug_metadata", [False, True])
def test_torch_onnx_debugging_metadata_is_dropped_unless_asked(tmp_path, debug_metadata):
    """torch.onnx's per-node stack traces name the files of the exporting machine (here qpass' own, where
    QuantizedLinear calls its op): not in the file by default."""
    import onnx

    model = _two_layers(qpass.NF4Config(compute_dtype=F32))
    x = _inputs(3, 64)
    qpass.export_onnx(model, (x,), tmp_path / "m.onnx", debug_metadata=debug_metadata)
    keys = {p.key for node in onnx.load(tmp_path / "m.onnx").graph.node for p in node.metadata_props}
    assert (keys & set(qpass_onnx.DEBUG_METADATA) == set(qpass_onnx.DEBUG_METADATA)) is debug_metadata
    assert (keys & set(qpass_onnx.DEBUG_METADATA) == set()) is not debug_metadata
    qpass_folder = str(Path(qpass.__file__).resolve().parent).encode()
    assert (qpass_folder in (tmp_path / "m.onnx").read_bytes()) is debug_metadata
    with torch.no_grad():
        assert relative_error(_run(tmp_path / "m.onnx", x), model(x)) < FLOAT32_SUM_ORDER


def test_an_interrupted_save_leaves_no_model_file(tmp_path, monkeypatch):
    model = _two_layers(qpass.NF4Config(compute_dtype=F32))
    program = qpass.export_onnx(model, (torch.randn(2, 64),))
    save = type(program).save

    def save_then_fail(self, destination, **kwargs):
        save(self, destination, **kwargs)  # the complete files, in the staging folder
        raise OSError("disk full")

    monkeypatch.setattr(type(program), "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        qpass_onnx.save_atomically(program, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(type(program), "save", save)

    replace = qpass_onnx.os.replace
    moved = []

    def replace_once_then_fail(source, destination):  # interrupted between the two renames into place
        if Path(destination).parent == tmp_path:  # not a rename of the ONNX writer's own, in the staging folder
            moved.append(destination)
            if len(moved) > 1:
                raise OSError("interrupted")
        replace(source, destination)

    def interrupted_save():
        moved.clear()
        monkeypatch.setattr(qpass_onnx.os, "replace", replace_once_then_fail)
        with pytest.raises(OSError, match="interrupted"):
            qpass_onnx.save_atomically(program, tmp_path / "m.onnx")
        monkeypatch.setattr(qpass_onnx.os, "replace", replace)

    interrupted_save()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx.data"]  # data without a model: nothing loads
    qpass_onnx.save_atomically(program, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    interrupted_save()  # over a complete earlier save: its model file goes before the new data comes
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx.data"]


def test_llama_with_dynamic_batch_and_sequence(tmp_path):
    """A transformers Llama, NF4 with int8 MLP down projections, exported once with dynamic batch and
    sequence, run by ONNX Runtime at other shapes."""
    plan = qpass.QPassConfig(qpass.NF4Config(compute_dtype=F32),
                             overrides={"*.mlp.down_proj": qpass.Int8Config(compute_dtype=F32)})
    model = CausalLMLogits(qpass.quantize(tiny_llama(), plan)).eval()
    ids = torch.randint(0, model.lm.config.vocab_size, (2, 12))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=64)}
    program = qpass.export_onnx(model, (ids,), tmp_path / "llama.onnx", dynamic_shapes=(dims,))
    layers = model.lm.config.num_hidden_layers
    ops = _op_types(program)
    assert ops["MatMulBnb4"] == 6 * layers and ops["MatMulInteger"] == layers
    for shape in [(2, 12), (3, 7), (1, 30)]:
        ids = torch.randint(0, model.lm.config.vocab_size, shape)
        with torch.no_grad():
            want = model(ids)
        assert relative_error(_run(tmp_path / "llama.onnx", ids), want) < ONNX_INT8_MODEL


@pytest.mark.parametrize("shape", [(1, 8), (2, 1), (8,)])
def test_causal_lm_export_refuses_an_example_that_would_fix_a_dimension(shape):
    from qpass.integrations.onnx_causal_lm import export_causal_lm

    model = qpass.quantize(tiny_llama(), qpass.NF4Config(compute_dtype=F32))
    with pytest.raises(ValueError, match=r"example_ids must be \[batch, sequence\] with batch >= 2 and sequence >= 2"):
        export_causal_lm(model, example_ids=torch.zeros(shape, dtype=torch.long))
