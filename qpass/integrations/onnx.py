"""ONNX export: quantized models as ONNX graphs that ONNX Runtime runs, the weights still quantized.

    onnx_program = qpass.export_onnx(model, (input_ids,), "model.onnx")   # nn.Module or ExportedProgram
    session = onnxruntime.InferenceSession("model.onnx")

``torch.onnx.export(..., dynamo=True)`` traces the model with ``torch.export`` (the ``qpass`` ops stay
single nodes) and translates each node to ONNX; ``TRANSLATIONS`` below is the table of qpass' ops:

* ``qpass::linear_4bit`` (NF4, FP4) becomes ONNX Runtime's contrib operator ``com.microsoft.MatMulBnb4``,
  which takes the bitsandbytes layout as it is: ``B`` the packed codes as 1-D uint8 ``[(N*K + 1) // 2]``
  (weight ``[N, K]`` flattened row-major, element 2i in the high nibble of byte i), ``absmax``
  ``[ceil(N*K / block_size)]`` in A's dtype, ``quant_type`` 1 for NF4 and 0 for FP4, and its own copy of
  bitsandbytes' code books. It has no double quantization, so a double-quantized absmax is decoded
  first, in float32 ONNX ops that repeat ``reference_4bit.block_absmax`` step for step (gather the
  uint8 codes from the 256-value map, multiply by the nested absmax of each group of 256 blocks, add
  the offset); ONNX Runtime folds that into a constant when it loads the model. ``A`` and ``absmax``
  are in the layer's compute dtype: ONNX Runtime's CPU provider runs ``MatMulBnb4`` in float32 only,
  its CUDA provider in float32, float16 and bfloat16. For CPU, quantize with
  ``compute_dtype=torch.float32``.
* ``qpass::linear_int8`` (LLM.int8()) becomes standard ONNX operators, the reference's arithmetic
  (``reference_int8.linear_int8``) rounding for rounding: row absmax of the input with the outlier
  entries (|x| >= threshold) left out, ``Round`` (half to even) to int8, ``MatMulInteger`` against
  ``CB^T`` (exact int32), the ``SCA x SCB / 127^2`` scaling in float32; the outlier columns are
  gathered (``NonZero``, so their count may change per call) from the input and from ``CB^T``,
  dequantized (``CB * SCB / 127``, rounded to the compute dtype) and multiplied in float32. The int8
  weight stays int8 in the file (transposed).

ONNX Runtime's outputs match the ``qpass`` ops' up to float32 rounding order: summation order in the
matmuls, and for int8 the order of the scale products once ONNX Runtime fuses ``MatMulInteger``,
``Cast`` and ``Mul`` into ``MatMulIntegerToFloat`` (its default optimization level; run op by op, a
layer with one outlier column is bit-exact). Relative errors of about 1e-7 per layer in float32
(tests/test_onnx_export.py). LLM.int8() itself magnifies such differences over a deep model, as it
does any 1e-7 change of its inputs (its activation rounding flips): see examples/onnx_runtime.py.
Only the linear ops are translated; a graph that calls ``qpass::dequantize_*`` itself is refused by
the exporter, naming the op.

``export_onnx`` is the entry point: it adds the table to ``torch.onnx.export``'s, views packed 4-bit
weights held in another ``quant_storage`` dtype as the uint8 bytes they are while it exports a module,
checks that each 4-bit layer's code book is the one ``MatMulBnb4`` has built in, drops torch.onnx's
per-node debugging metadata (``DEBUG_METADATA``, unless ``debug_metadata=True``), and only then writes
the file. Needs ``onnxscript`` (``pip install qpass[onnx]``); ONNX Runtime runs the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar, Union

import torch
from torch import nn

try:
    import onnx_ir  # onnxscript's own dependency: the model torch.onnx builds
    import onnxscript
    from onnxscript import opset18 as op
    from onnxscript.onnx_types import BFLOAT16, FLOAT, FLOAT16, INT8, INT64, UINT8
    from onnxscript.values import Opset
except ImportError as err:
    raise ImportError(f"qpass' ONNX export needs onnxscript and onnx: pip install 'qpass[onnx]' ({err})") from err
from torch.export import ExportedProgram

from ..kernels.codebooks import DOUBLE_QUANT_BLOCKSIZE, code_4bit
from ..kernels.reference_int8 import INT8_DEQUANT, INT8_SCALE_PRODUCT
from ..modules import QuantizedLinear
from ..passes.program_edit import input_tensors, quantized_linear_nodes

MICROSOFT = Opset("com.microsoft", 1)
MATMUL_BNB4_QUANT_TYPES = {"fp4": 0, "nf4": 1}  # MatMulBnb4's quant_type attribute

_TORCH_TO_ONNX_DTYPE = {torch.float32: FLOAT.dtype, torch.float16: FLOAT16.dtype, torch.bfloat16: BFLOAT16.dtype}
TFloat = TypeVar("TFloat", bound=Union[FLOAT, FLOAT16, BFLOAT16])


@onnxscript.script(MICROSOFT)
def matmul_bnb4(A: TFloat, B: UINT8, absmax: TFloat, K: int, N: int, block_size: int, quant_type: int) -> TFloat:
    # A function around the contrib op: onnx has no schema for it, and the exporter needs a signature.
    return MICROSOFT.MatMulBnb4(A, B, absmax, K=K, N=N, block_size=block_size, quant_type=quant_type)


def _onnx_dtype(dtype) -> int:
    """The ONNX element type of a torch dtype argument (the exporter hands them over converted)."""
    return _TORCH_TO_ONNX_DTYPE[dtype] if isinstance(dtype, torch.dtype) else int(dtype)


def _cast(x, source: int, to: int):
    """``x`` (of ONNX type ``source``: the exporter knows the types of graph inputs only) as type ``to``."""
    return x if int(source) == int(to) else op.Cast(x, to=to)


def _flatten_rows(x, features: int):
    """``x [..., features]`` as ``[rows, features]``."""
    return op.Reshape(x, op.Constant(value_ints=[-1, features]))


def _unflatten_rows(y, like, features: int):
    """``y [rows, features]`` back to ``like``'s leading dimensions: ``[..., features]``."""
    # No Slice: the exporter's optimizer scans the whole graph once per Slice node (its SlicesSplit rule).
    return op.Reshape(y, op.Concat(op.Shape(like, end=-1), op.Constant(value_ints=[features]), axis=0))


def _output_dtype(x, compute: int) -> int:
    """The ops return ``x``'s dtype when it is a float one, else the compute dtype (``ops._output_dtype``)."""
    return int(x.dtype) if int(x.dtype) in _TORCH_TO_ONNX_DTYPE.values() else compute


def _block_absmax(absmax, nested_absmax, nested_code, offset):
    """float32 absmax per 4-bit block: ``reference_4bit.block_absmax`` in ONNX ops."""
    if nested_absmax is None:
        return _cast(absmax, absmax.dtype, FLOAT.dtype)
    codes = op.Cast(absmax, to=INT64.dtype)
    group = op.Div(op.Range(op.Constant(value_int=0), op.Constant(value_int=absmax.shape[0]),
                            op.Constant(value_int=1)), op.Constant(value_int=DOUBLE_QUANT_BLOCKSIZE))
    return op.Add(op.Mul(op.Gather(nested_code, codes), op.Gather(nested_absmax, group)), offset)


def linear_4bit(x, packed, quant_map, absmax, nested_absmax, nested_code, offset, bias,
                out_features: int, in_features: int, blocksize: int, quant_type: str, compute_dtype):
    """``qpass::linear_4bit`` as ``com.microsoft.MatMulBnb4`` (``quant_map`` is checked by ``export_onnx``)."""
    if int(packed.dtype) != UINT8.dtype:
        raise ValueError(
            f"qpass ONNX export: the packed 4-bit weight {packed.name!r} is stored as {packed.dtype}, and ONNX "
            "cannot reinterpret it as the uint8 bytes MatMulBnb4 reads; export the nn.Module with "
            "qpass.export_onnx (it views the bytes as uint8), or quantize with quant_storage=torch.uint8"
        )
    compute = _onnx_dtype(compute_dtype)
    scales = _cast(_block_absmax(absmax, nested_absmax, nested_code, offset), FLOAT.dtype, compute)
    codes = op.Reshape(packed, op.Constant(value_ints=[-1]))
    y = matmul_bnb4(_cast(x, x.dtype, compute), codes, scales, K=in_features, N=out_features, block_size=blocksize,
                    quant_type=MATMUL_BNB4_QUANT_TYPES[quant_type])
    if bias is not None:
        y = op.Add(y, _cast(bias, bias.dtype, compute))
    return _cast(y, compute, _output_dtype(x, compute))


def linear_int8(x, cb, scb, bias, threshold: float, compute_dtype):
    """``qpass::linear_int8`` in standard ONNX operators, ``reference_int8.linear_int8`` step for step."""
    compute = _onnx_dtype(compute_dtype)
    in_features = cb.shape[1]
    x_compute = _cast(_flatten_rows(x, in_features), x.dtype, compute)
    xf = _cast(x_compute, compute, FLOAT.dtype)
    scb_f = _cast(scb, scb.dtype, FLOAT.dtype)
    magnitude = op.Abs(xf)
    if threshold > 0:
        limit = op.Constant(value_float=threshold)
        outlier_columns = op.GreaterOrEqual(op.ReduceMax(magnitude, op.Constant(value_ints=[0]), keepdims=1), limit)
        magnitude = op.Where(op.GreaterOrEqual(magnitude, limit), op.Constant(value_float=0.0), magnitude)
    row_absmax = op.ReduceMax(magnitude, op.Constant(value_ints=[1]), keepdims=1)  # [rows, 1]
    nonzero = op.Where(op.Greater(row_absmax, op.Constant(value_float=0.0)), row_absmax, op.Constant(value_float=1.0))
    # torch evaluates the reference's ``127.0 / row_absmax`` as ``row_absmax.reciprocal() * 127``: one more rounding.
    quantized = op.Round(op.Mul(xf, op.Mul(op.Reciprocal(nonzero), op.Constant(value_float=127.0))))
    if threshold > 0:
        quantized = op.Where(outlier_columns, op.Constant(value_float=0.0), quantized)
    weight_t = op.Transpose(cb, perm=[1, 0])  # CB^T [in, out]: the int8 product's B, and rows to gather
    product = op.MatMulInteger(op.Cast(quantized, to=INT8.dtype), weight_t)  # exact int32
    scb_row = op.Unsqueeze(scb_f, op.Constant(value_ints=[0]))
    out = op.Mul(op.Mul(op.Cast(product, to=FLOAT.dtype), op.Mul(row_absmax, scb_row)),
                 op.Constant(value_float=INT8_SCALE_PRODUCT))
    bias_f = None if bias is None else _cast(_cast(bias, bias.dtype, compute), compute, FLOAT.dtype)
    if threshold > 0:
        columns = op.Reshape(op.NonZero(op.Reshape(outlier_columns, op.Constant(value_ints=[-1]))),
                             op.Constant(value_ints=[-1]))
        x_outliers = _cast(op.Gather(x_compute, columns, axis=1), compute, FLOAT.dtype)
        w_outliers_t = op.Mul(op.Mul(op.Cast(op.Gather(weight_t, columns, axis=0), to=FLOAT.dtype), scb_row),
                              op.Constant(value_float=INT8_DEQUANT))  # (CB * SCB / 127)^T, outlier rows
        w_outliers_t = _cast(_cast(w_outliers_t, FLOAT.dtype, compute), compute, FLOAT.dtype)
        outlier_term = op.MatMul(x_outliers, w_outliers_t)
        if bias_f is not None:
            outlier_term = op.Add(outlier_term, bias_f)
        out = op.Add(outlier_term, out)
    elif bias_f is not None:
        out = op.Add(out, bias_f)
    out = _cast(_cast(out, FLOAT.dtype, compute), compute, _output_dtype(x, compute))
    return _unflatten_rows(out, x, cb.shape[0])


TRANSLATIONS = {
    torch.ops.qpass.linear_4bit.default: linear_4bit,
    torch.ops.qpass.linear_int8.default: linear_int8,
}


@contextlib.contextmanager
def packed_as_uint8(model: nn.Module) -> Iterator[None]:
    """Within the block, 4-bit layers whose packed codes are held in another ``quant_storage`` dtype hold
    the same bytes as uint8 ``[(n + 1) // 2, 1]``, as ``MatMulBnb4`` reads them, and a layout that says
    so (the layer refuses codes of another dtype than its layout's); restored on exit."""
    held = {}
    for layer in model.modules():
        packed = layer._buffers.get("weight") if isinstance(layer, QuantizedLinear) else None
        if packed is not None and "quant_map" in layer.layout.tensor_names and packed.dtype != torch.uint8:
            held[layer] = packed, layer.layout
            config = dataclasses.replace(layer.layout.config, quant_storage=torch.uint8)
            layer.layout = dataclasses.replace(layer.layout, config=config)
            layer.set_quantized_tensor_("weight", packed.reshape(-1).view(torch.uint8).unsqueeze(1))
    try:
        yield
    finally:
        for layer, (packed, layout) in held.items():
            layer.layout = layout
            layer.set_quantized_tensor_("weight", packed)


def check_code_books(program: ExportedProgram) -> None:
    """Raise ``ValueError`` naming the layer unless every ``linear_4bit`` node's code book is bitsandbytes'
    NF4 or FP4 one, the one ``MatMulBnb4`` has built in (a checkpoint may carry another ``quant_map``)."""
    values = input_tensors(program)
    for q in quantized_linear_nodes(program, program.graph):
        if "quant_map" not in q.call.tensors:
            continue
        layer, quant_type = q.layer, q.call.layout.config.quant_type
        code = values.get(q.call.tensors["quant_map"].name)
        standard = code_4bit(quant_type)
        if code is None or code.dtype != standard.dtype or not torch.equal(code.cpu(), standard):
            raise ValueError(
                f"layer {layer!r}: its 4-bit code book (quant_map) is not bitsandbytes' {quant_type.upper()} one, "
                "which ONNX Runtime's MatMulBnb4 has built in, so the exported model would decode other values. "
                "Re-quantize it first: qpass.quantize(qpass.dequantize(model), ...) writes the standard code book"
            )


# What torch.onnx writes on every node for debugging: the Python stack trace of the traced call (with
# this machine's absolute file paths), the module path and classes, the FX node. For SmolLM2-135M with
# KV cache it was 20.2 of the graph file's 21.6 MB (README, "ONNX Runtime"); ONNX Runtime ignores it.
DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy",
                  "pkg.torch.onnx.name_scopes", "namespace")


def drop_debug_metadata(program: torch.onnx.ONNXProgram) -> None:
    """Removes the ``DEBUG_METADATA`` keys from every node of ``program``'s model, in its graph, subgraphs
    and functions."""
    for graph in (program.model.graph, *program.model.functions.values()):
        for node in onnx_ir.traversal.RecursiveGraphIterator(graph):
            for key in DEBUG_METADATA:
                node.metadata_props.pop(key, None)


def export_onnx(model: nn.Module | ExportedProgram, args: tuple = (), f: str | os.PathLike | None = None, *,
                kwargs: dict | None = None, debug_metadata: bool = False, **options) -> torch.onnx.ONNXProgram:
    """``torch.onnx.export(model, args, dynamo=True, ...)`` with qpass' ops translated (module docstring).

    ``model``: a module quantized with ``qpass.quantize`` (or loaded with ``qpass.from_pretrained``), or a
    quantized ``ExportedProgram``. ``options`` go to ``torch.onnx.export`` (``dynamic_shapes``,
    ``opset_version``, ``external_data``, ...; a ``custom_translation_table`` is merged with qpass'),
    except that ``optimize`` defaults to False (see below; ``optimize=True`` runs the exporter's
    optimizer, which folds constants and tidies the graph, at a cost quadratic in its size).
    Returns the ``ONNXProgram``; with ``f``, also writes it there, atomically (the model file appears only
    once it and its external data file, if any, are complete). Refuses, naming the layer, a 4-bit code
    book ``MatMulBnb4`` does not have. ``debug_metadata=True`` keeps torch.onnx's per-node stack traces
    and module paths (``DEBUG_METADATA``) in the graph, to trace an ONNX node back to the Python source;
    they are dropped by default, since they are most of the graph file and hold this machine's paths.
    """
    if options.pop("dynamo", True) is not True:
        raise ValueError("qpass.export_onnx uses torch.onnx's dynamo exporter; the TorchScript one (dynamo=False) "
                         "cannot translate torch.library ops")
    external_data = options.pop("external_data", True)
    # Off unless asked: onnxscript's optimizer takes time quadratic in the graph's size (minutes for
    # SmolLM2-135M in int8), and ONNX Runtime folds the same constants when it loads the model, so the
    # two files run about as fast (README, "ONNX Runtime").
    options.setdefault("optimize", False)
    table = {**TRANSLATIONS, **options.pop("custom_translation_table", {})}
    swap = packed_as_uint8(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with swap:
        program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, custom_translation_table=table, **options)
    check_code_books(program.exported_program)
    if not debug_metadata:
        drop_debug_metadata(program)
    if f is not None:
        save_atomically(program, Path(f), external_data=external_data)
    return program


def save_atomically(program: torch.onnx.ONNXProgram, path: Path, external_data: bool = True) -> None:
    """``program.save(path)`` into a temporary folder beside ``path``, then renamed into place: a model
    file already there is removed first, then the external data file (``<name>.data``) moves, then the
    model file, so an interrupted save never leaves a model file that loads (nor an old one beside new data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
        staged = Path(staging) / path.name
        program.save(staged, external_data=external_data)
        path.unlink(missing_ok=True)
        for written in sorted(Path(staging).iterdir(), key=lambda p: p == staged):
            os.replace(written, path.parent / written.name)
