"""The ``qpass`` torch.library ops: the stable boundary between front-ends and kernels.

Each op has a plain-torch reference implementation (any device, see ``reference_4bit`` and
``reference_int8``), a fake kernel for tracing (``torch.export``, ``torch.compile``), and, for the
linear ops, an autograd formula for the input and bias (quantized weights are frozen), so adapters such
as LoRA train through a quantized base layer.

The linear and dequantize ops are ``torch.library.triton_op``s: their bodies (Triton launches through
``wrap_triton`` on CUDA, plain torch elsewhere) double as fake kernels, and ``torch.compile`` traces
into them, so Inductor places the Triton kernels, or fuses the reference, in its generated code.
``torch.export`` keeps them as single ``qpass`` nodes.

Linear ops take ``x [..., in_features]`` of any float dtype, compute in ``compute_dtype`` and return
``[..., out_features]`` in ``x``'s dtype, as bitsandbytes' ``Linear4bit``/``Linear8bitLt`` do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import reference_4bit as ref4
from . import reference_int8 as ref8
from .codebooks import DOUBLE_QUANT_BLOCKSIZE
from .reference_matmul import (BLOCK_WEIGHTS, dequantize_by_row_blocks, grad_input_by_row_blocks, linear_by_row_blocks,
                               linear_fp32_accumulate)


HAS_TRITON = importlib.util.find_spec("triton") is not None
# The Triton kernels hold inline PTX (mul.rn, warp shuffles): NVIDIA GPUs only. A ROCm build of torch
# calls its GPUs "cuda" too, and runs the reference there.
ON_ROCM = torch.version.hip is not None


def _triton_op(name: str):
    """``torch.library.triton_op(name, mutates_args=())``. Without Triton installed, torch logs "Triton not
    available" once per op while registering it; the ops then run their reference everywhere, so that
    warning is muted here (only while registering)."""

    def register(fn):
        logger = logging.getLogger("torch._library.triton")
        level = logger.level
        if not HAS_TRITON:
            logger.setLevel(logging.ERROR)
        try:
            return torch.library.triton_op(name, mutates_args=())(fn)
        finally:
            logger.setLevel(level)

    return register


def use_triton(x: Tensor) -> bool:
    """Whether the linear ops run their Triton kernels for ``x``: on NVIDIA CUDA, when Triton is
    installed. Decided inside each op's body from the device, so Inductor traces the reference for
    CPU inputs."""
    return HAS_TRITON and not ON_ROCM and x.device.type == "cuda"


@contextlib.contextmanager
def reference_kernels():
    """Within this block the ops run their plain-torch reference on every device, CUDA included: what the
    Triton kernels are tested and benchmarked against. Eager calls only: a graph compiled before keeps
    what it traced."""
    global use_triton
    triton_where_it_runs = use_triton
    use_triton = lambda x: False  # noqa: E731
    try:
        yield
    finally:
        use_triton = triton_where_it_runs


def _autocast_off(device_type: str):
    """A context in which autocast is off for ``device_type``, if it was on. The linear ops compute in their
    compute dtype whatever autocast says: it has no rule for qpass' ops, but the matmuls of an op's body
    would otherwise take autocast's dtype when the op runs eagerly (the reference on any device, the
    dequantize-then-cuBLAS path on CUDA), though not compiled nor in a Triton kernel. Under float16
    autocast that would also bound the reference's float32 sums by float16's range."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _output_dtype(x: Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    return x.dtype if x.is_floating_point() else compute_dtype


def _grad_input(grad_out: Tensor, weight: Tensor, compute_dtype: torch.dtype, x_dtype: torch.dtype) -> Tensor:
    """The input's gradient ``grad_out @ W`` (``weight`` the dequantized ``W`` in ``compute_dtype``) with
    the forward's numerics: compute-dtype operands, float32 accumulation, one rounding. On CUDA that is
    cuBLAS's tensor-core GEMM in the compute dtype (a float32 GEMM would be several times slower and
    hold a float32 copy of the weight); elsewhere float32 operands, as the reference computes."""
    grad_out = grad_out.to(compute_dtype)
    if grad_out.device.type == "cuda":
        return (grad_out @ weight).to(x_dtype)
    return (grad_out.float() @ weight.float()).to(compute_dtype).to(x_dtype)


def _check_input(x: Tensor, in_features: int, op: str) -> None:
    torch._check(
        x.dim() >= 1 and x.shape[-1] == in_features,
        lambda: f"qpass.{op}: input has shape {tuple(x.shape)}, but this layer takes in_features={in_features} "
        "in its last dimension",
    )


# ----------------------------------------------------------------------------------------------------
# 4-bit (NF4 / FP4)
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("qpass::quantize_4bit", mutates_args=())
def quantize_4bit(weight: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """Packed uint8 codes ``[(n + 1) // 2, 1]`` and float32 absmax ``[ceil(n / blocksize)]``."""
    return ref4.quantize_4bit(weight, blocksize, quant_type)


@quantize_4bit.register_fake
def _(weight, blocksize, quant_type):
    n = weight.numel()
    return (
        weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        weight.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32),
    )


@torch.library.custom_op("qpass::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """uint8 codes ``[n]`` into the 256-value ``code`` and float32 absmax ``[ceil(n / blocksize)]``."""
    return ref4.quantize_blockwise_8bit(x, code, blocksize)


@quantize_blockwise_8bit.register_fake
def _(x, code, blocksize):
    n = x.numel()
    return (
        x.new_empty((n,), dtype=torch.uint8),
        x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32),
    )


def _dequantize_weight_4bit(packed, quant_map, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype):
    scales = ref4.block_absmax(absmax, nested_absmax, nested_code, offset, DOUBLE_QUANT_BLOCKSIZE)
    return ref4.dequantize_4bit(packed, quant_map, scales, shape, blocksize, dtype)


@_triton_op("qpass::dequantize_4bit")
def dequantize_4bit(
    packed: Tensor,
    quant_map: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """The weight of ``shape`` in ``dtype``; absmax is uint8 when double-quantized (with nested_*).

    CUDA runs one Triton pass (``triton_4bit.dequantize_4bit_triton``, bit for bit the reference);
    every other device the reference, which Inductor fuses into its consumer under torch.compile, and
    which an eager CPU call runs a block of rows at a time (``dequantize_by_row_blocks``, the same bits)."""
    if use_triton(packed) and len(shape) == 2:
        from .triton_4bit import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, quant_map, absmax, nested_absmax, nested_code, offset, shape[0], shape[1],
                                      blocksize, dtype, launch=torch.library.wrap_triton)
    if len(shape) == 2 and _by_row_blocks_eagerly(packed, *shape):
        decoder = _row_decoder_4bit(packed, quant_map, absmax, nested_absmax, nested_code, offset, *shape, blocksize,
                                    torch.float32)
        return dequantize_by_row_blocks(decoder, dtype, packed.device)
    return _dequantize_weight_4bit(packed, quant_map, absmax, nested_absmax, nested_code, offset, shape, blocksize,
                                   dtype)


@_triton_op("qpass::linear_4bit")
def linear_4bit(
    x: Tensor,
    packed: Tensor,
    quant_map: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    bias: Optional[Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    quant_type: str,
    compute_dtype: torch.dtype,
) -> Tensor:
    """``x @ W^T + bias`` with ``W`` the 4-bit weight ``[out_features, in_features]``.

    ``quant_map`` is the 16-value code book of ``quant_type`` ("nf4" / "fp4"). CUDA runs the fused
    Triton kernels (``triton_4bit``); the CPU ``linear_4bit_cpu`` (or, compiled, for a few rows of a small
    weight, a reduction Inductor fuses with the decoding); every other device the reference
    (dequantize, then matmul)."""
    _check_input(x, in_features, "linear_4bit")
    x2d = x.reshape(-1, in_features)
    with _autocast_off(x.device.type):
        if use_triton(x):
            from .triton_4bit import linear_4bit_triton

            out = linear_4bit_triton(
                x2d, packed, quant_map, absmax, nested_absmax, nested_code, offset, bias,
                out_features, in_features, blocksize, compute_dtype, launch=torch.library.wrap_triton,
            )
        elif _fuse_dequantization(x2d, out_features, in_features, blocksize):
            scales = ref4.block_absmax(absmax, nested_absmax, nested_code, offset, DOUBLE_QUANT_BLOCKSIZE)
            out = ref4.linear_4bit_rows(x2d, packed, quant_map, scales, out_features, in_features, blocksize, bias,
                                        compute_dtype)
        elif x.device.type == "cpu":
            out = torch.ops.qpass.linear_4bit_cpu(x2d.to(compute_dtype), packed, quant_map, absmax, nested_absmax,
                                                  nested_code, offset, bias, out_features, in_features, blocksize)
        else:
            out = _linear_4bit_reference(x2d, packed, quant_map, absmax, nested_absmax, nested_code, offset, bias,
                                         out_features, in_features, blocksize, compute_dtype)
    return out.reshape(*x.shape[:-1], out_features).to(_output_dtype(x, compute_dtype))


def _linear_4bit_reference(x2d, packed, quant_map, absmax, nested_absmax, nested_code, offset, bias, out_features,
                           in_features, blocksize, compute_dtype):
    weight = _dequantize_weight_4bit(packed, quant_map, absmax, nested_absmax, nested_code, offset,
                                     [out_features, in_features], blocksize, compute_dtype)
    return linear_fp32_accumulate(x2d, weight, bias, compute_dtype)


@torch.library.custom_op("qpass::linear_4bit_cpu", mutates_args=(), device_types="cpu")
def linear_4bit_cpu(
    x: Tensor,
    packed: Tensor,
    quant_map: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    bias: Optional[Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
) -> Tensor:
    """``linear_4bit``'s CPU path for a 2-D ``x`` already in the compute dtype (the result's; no dtype
    argument, as for ``linear_int8_cpu``). A weight of more than ``BLOCK_WEIGHTS`` weights is decoded a
    block of rows at a time (``_decode_by_row_blocks``), a smaller one whole. An op of its own so that
    ``torch.compile`` runs it as it is rather than Inductor's code for the whole decoding, which was
    slower than this eager code on 2 CPU cores (benchmarks/README.md, "CPU path": 4096x4096 NF4 at
    M = 16, 103 ms compiled before, 37 ms now)."""
    with _autocast_off(x.device.type):  # also when called on its own
        if _decode_by_row_blocks(out_features, in_features):
            decoder = _row_decoder_4bit(packed, quant_map, absmax, nested_absmax, nested_code, offset, out_features,
                                        in_features, blocksize, x.dtype)
            return linear_by_row_blocks(x, decoder, bias, x.dtype)
        return _linear_4bit_reference(x, packed, quant_map, absmax, nested_absmax, nested_code, offset, bias,
                                      out_features, in_features, blocksize, x.dtype)


@linear_4bit_cpu.register_fake
def _(x, packed, quant_map, absmax, nested_absmax, nested_code, offset, bias, out_features, in_features, blocksize):
    return x.new_empty((x.shape[0], out_features))


# Up to this many rows of x and weights, the compiled CPU path decodes the 4-bit weight inside one
# reduction (ref4.linear_4bit_rows) that Inductor generates, instead of calling linear_4bit_cpu. Measured
# by hand on 2 CPU cores (torch 2.13, NF4, bf16 compute, one quantized nn.Linear compiled against the same
# layer eager, which runs linear_4bit_cpu; best of 15, Inductor caches off): 1536x576 at M=1 0.35 against
# 1.15 ms, at M=8 0.92 against 1.48 ms; 2048x2048 at M=1 2.6-2.9 against 3.4-6.5 ms; but 4096x2048 at
# M=1 22.9 against 12.1 ms, and 4096x4096 48 against 14 ms.
FUSED_DEQUANT_MAX_M = 8
FUSED_DEQUANT_MAX_WEIGHTS = 2048 * 2048


def _fuse_dequantization(x2d: Tensor, out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether the reference computes the 4-bit linear as ``linear_4bit_rows``: when traced, not run
    (``_traced``: Inductor traces this body), for a static number of rows up to ``FUSED_DEQUANT_MAX_M``, a
    weight of up to ``FUSED_DEQUANT_MAX_WEIGHTS``, and when no block crosses a row. Eagerly it would
    materialise ``[rows, out, in]``."""
    rows = x2d.shape[0]
    return (isinstance(rows, int) and rows <= FUSED_DEQUANT_MAX_M and out_features * in_features
            <= FUSED_DEQUANT_MAX_WEIGHTS and in_features % blocksize == 0 and _traced(x2d))


def _decode_by_row_blocks(out_features: int, in_features: int) -> bool:
    """Whether the CPU path multiplies by a quantized weight decoded a block of rows at a time
    (``reference_matmul.linear_by_row_blocks``) rather than whole: when it holds more than one block
    (``BLOCK_WEIGHTS``). It never allocates the decoded weight (a float32 copy, several in passing),
    and multiplies each block while it is in cache. Measured by hand on 2 CPU cores (torch 2.13, NF4,
    bf16 compute, the op called eagerly, median of 9): 4096x4096 at M=1 13 against 132 ms, 11008x4096 65
    against 411 ms; 2048x2048 at M=1 3.4 against 6.1 ms (best of 25); a weight of one block is 10-20%
    faster decoded whole (576x576, 1536x576). benchmarks/README.md has the benchmark's figures."""
    return out_features * in_features > BLOCK_WEIGHTS


def _row_decoder_4bit(packed, quant_map, absmax, nested_absmax, nested_code, offset, out_features, in_features,
                      blocksize, dtype) -> ref4.RowDecoder4bit:
    scales = ref4.block_absmax(absmax, nested_absmax, nested_code, offset, DOUBLE_QUANT_BLOCKSIZE)
    return ref4.RowDecoder4bit(packed, quant_map, scales, out_features, in_features, blocksize, dtype, BLOCK_WEIGHTS)


def _by_row_blocks_eagerly(t: Tensor, out_features: int, in_features: int) -> bool:
    """Whether an eager CPU call (a dequantization, or a backward's input gradient) handles the weight a
    block of rows at a time (``_decode_by_row_blocks``) rather than decoding it whole. Traced, the
    decoding is left to the compiler, which fuses it into its consumer."""
    return t.device.type == "cpu" and not _traced(t) and _decode_by_row_blocks(out_features, in_features)


def _grad_input_by_row_blocks(grad_out: Tensor, decoder, compute_dtype: torch.dtype, x_dtype: torch.dtype) -> Tensor:
    """``_grad_input`` with the weight given by a ``RowDecoder``, never held whole."""
    with _autocast_off(grad_out.device.type):
        grad_2d = grad_input_by_row_blocks(grad_out.reshape(-1, decoder.out_features), decoder, compute_dtype)
    return grad_2d.reshape(*grad_out.shape[:-1], decoder.in_features).to(x_dtype)


def _traced(x: Tensor) -> bool:
    """Whether this op body is being traced (``torch.compile``, ``torch.export``) rather than run. torch 2.13
    and 2.15 set ``torch.compiler.is_compiling()`` while Inductor traces a ``triton_op``'s body; torch 2.11
    traces it with fake tensors and the flag unset."""
    return torch.compiler.is_compiling() or is_fake(x)  # is_fake: also a functional tensor wrapping a fake one


def _setup_linear_4bit(ctx, inputs, output):
    (x, packed, quant_map, absmax, nested_absmax, nested_code, offset, bias, out_f, in_f, blocksize, _,
     compute_dtype) = inputs
    ctx.save_for_backward(packed, quant_map, absmax, nested_absmax, nested_code, offset)
    ctx.meta = (x.dtype, None if bias is None else bias.dtype, [out_f, in_f], blocksize, compute_dtype)


def _backward_linear_4bit(ctx, grad_out):
    packed, quant_map, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    x_dtype, bias_dtype, shape, blocksize, compute_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0] and _by_row_blocks_eagerly(grad_out, *shape):
        decoder = _row_decoder_4bit(packed, quant_map, absmax, nested_absmax, nested_code, offset, *shape, blocksize,
                                    compute_dtype)
        grad_x = _grad_input_by_row_blocks(grad_out, decoder, compute_dtype, x_dtype)
    elif ctx.needs_input_grad[0]:
        weight = torch.ops.qpass.dequantize_4bit(
            packed, quant_map, absmax, nested_absmax, nested_code, offset, shape, blocksize, compute_dtype
        )
        with _autocast_off(grad_out.device.type):
            grad_x = _grad_input(grad_out, weight, compute_dtype, x_dtype)
    if bias_dtype is not None and ctx.needs_input_grad[7]:
        grad_bias = grad_out.reshape(-1, shape[0]).sum(0).to(bias_dtype)
    return (grad_x,) + (None,) * 6 + (grad_bias,) + (None,) * 5


linear_4bit.register_autograd(_backward_linear_4bit, setup_context=_setup_linear_4bit)


# ----------------------------------------------------------------------------------------------------
# int8 (LLM.int8() with outlier decomposition)
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("qpass::int8_vectorwise_quant", mutates_args=())
def int8_vectorwise_quant(x: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise int8 of a 2-D tensor: (int8 ``[m, k]``, float32 row absmax ``[m]``, bool outlier
    column mask ``[k]``)."""
    return ref8.int8_vectorwise_quant(x, threshold)


@int8_vectorwise_quant.register_fake
def _(x, threshold):
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
        x.new_empty(x.shape[-1:], dtype=torch.bool),
    )


@_triton_op("qpass::dequantize_int8")
def dequantize_int8(cb: Tensor, scb: Tensor, dtype: torch.dtype) -> Tensor:
    """``CB * SCB / 127`` as ``dtype``: the int8 weight ``[out, in]`` in full precision. An eager CPU call
    decodes it a block of rows at a time (``dequantize_by_row_blocks``, the same bits)."""
    if _by_row_blocks_eagerly(cb, *cb.shape):
        return dequantize_by_row_blocks(ref8.RowDecoderInt8(cb, scb, torch.float32, BLOCK_WEIGHTS), dtype, cb.device)
    return ref8.dequantize_int8(cb, scb, dtype)


@_triton_op("qpass::linear_int8")
def linear_int8(
    x: Tensor, cb: Tensor, scb: Tensor, bias: Optional[Tensor], threshold: float, compute_dtype: torch.dtype
) -> Tensor:
    """LLM.int8() ``x @ W^T + bias``, outlier columns (|x| >= threshold) in ``compute_dtype``.

    CUDA runs the Triton kernels (``triton_int8``); every other device the reference, the CPU through
    ``linear_int8_cpu``."""
    _check_input(x, cb.shape[1], "linear_int8")
    x2d = x.reshape(-1, x.shape[-1])
    with _autocast_off(x.device.type):
        if use_triton(x):
            from .triton_int8 import linear_int8_triton

            out = linear_int8_triton(x2d, cb, scb, bias, threshold, compute_dtype, launch=torch.library.wrap_triton)
        elif x.device.type == "cpu":
            out = torch.ops.qpass.linear_int8_cpu(x2d.to(compute_dtype), cb, scb, bias, threshold)
        else:
            out = ref8.linear_int8(x2d, cb, scb, bias, threshold, compute_dtype)
    return out.reshape(*x.shape[:-1], cb.shape[0]).to(_output_dtype(x, compute_dtype))


@torch.library.custom_op("qpass::linear_int8_cpu", mutates_args=(), device_types="cpu")
def linear_int8_cpu(x: Tensor, cb: Tensor, scb: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """``linear_int8``'s CPU path: ``ref8.linear_int8(..., gather_outliers=True)``, the outlier term from
    the outlier columns of the weight alone (a host sync, free on the CPU). An op of its own because the
    gather's shape depends on the data: tracing (fake tensors, ``torch.export``) takes its fake kernel,
    and ``torch.compile`` runs it as it is (Inductor's code for the masked form was slower than eager).

    ``x`` comes in the compute dtype, which is also the result's: no dtype argument, because AOTInductor
    in torch 2.11 passes a custom op's dtype argument to its CPU kernel as the wrong dtype (export's
    enum number read as c10's: float32 became float64, and the result was read as float32)."""
    with _autocast_off(x.device.type):  # also when called on its own
        return ref8.linear_int8(x, cb, scb, bias, threshold, x.dtype, gather_outliers=True)


@linear_int8_cpu.register_fake
def _(x, cb, scb, bias, threshold):
    return x.new_empty((x.shape[0], cb.shape[0]))


def _setup_linear_int8(ctx, inputs, output):
    x, cb, scb, bias, threshold, compute_dtype = inputs
    ctx.save_for_backward(cb, scb)
    ctx.meta = (x.dtype, None if bias is None else bias.dtype, compute_dtype)


def _backward_linear_int8(ctx, grad_out):
    cb, scb = ctx.saved_tensors
    x_dtype, bias_dtype, compute_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0] and _by_row_blocks_eagerly(grad_out, *cb.shape):
        decoder = ref8.RowDecoderInt8(cb, scb, compute_dtype, BLOCK_WEIGHTS)
        grad_x = _grad_input_by_row_blocks(grad_out, decoder, compute_dtype, x_dtype)
    elif ctx.needs_input_grad[0]:
        weight = torch.ops.qpass.dequantize_int8(cb, scb, compute_dtype)
        with _autocast_off(grad_out.device.type):
            grad_x = _grad_input(grad_out, weight, compute_dtype, x_dtype)
    if bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, cb.shape[0]).sum(0).to(bias_dtype)
    return grad_x, None, None, grad_bias, None, None


linear_int8.register_autograd(_backward_linear_int8, setup_context=_setup_linear_int8)
