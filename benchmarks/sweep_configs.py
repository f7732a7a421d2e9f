"""Time every kernel config and K-split count of one quantized layer, untuned, next to the op's own
choice and bf16: the data for choosing the autotune configs and the split heuristics
(``GEMV_TARGET_PROGRAMS`` in ``kernels/triton_4bit.py``, ``GEMM_TARGET_PROGRAMS`` in
``kernels/triton_common.py``).

    python benchmarks/sweep_configs.py --shape 28672x8192 --ms 1,16,64,128 --out results
    python benchmarks/sweep_configs.py --format int8 --shape 28672x8192 --ms 16,128,2048 --out results
    python benchmarks/sweep_configs.py --ms 16,64,128 --match "SWAP_AB: True"  # only some configs
    python benchmarks/sweep_configs.py --device cpu --shape 64x256 --ms 1,16 --splits 1,2  # interpreter smoke run

NF4 (double quantization, as the issue's targets): M = 1 sweeps the GEMV's configs, larger M the
GEMM's (those the autotuner would consider for that M); from ``DEQUANT_MATMUL_MIN_M`` on the op calls
cuBLAS, which has nothing to sweep. int8 (threshold 6.0): the fused int8 GEMM's configs at any M; from
``INT_MM_MIN_M`` on, the op's own choice is cuBLAS's int8 product with the kernel as epilogue. On CUDA
each variant is timed as a replayed CUDA graph (no launch overhead), so the split-K reduction and the
int8 activation quantization count but Python does not. Each row also has its output's relative error
against the op's plain-torch reference (``error_vs_reference``), and each M's summary line says
"WRONG RESULTS" if any is above ``WRONG_ERROR``: the fastest config is worth nothing if it is wrong.
Rows go to ``sweep_<format>_<tag>.json``, rewritten after every config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import qpass
from qpass.evaluation import relative_error
from qpass.formats import quantize_weight
from qpass.kernels import triton_4bit, triton_int8
from qpass.kernels.triton_4bit import DEQUANT_MATMUL_MIN_M, gemv_applies, gemv_split, linear_4bit_triton
from qpass.kernels.triton_common import gemm_split, m_bucket, prune_gemm_configs
from qpass.kernels.triton_int8 import int_mm_applies, linear_int8_triton

sys.path.insert(0, str(Path(__file__).parent))
from quantized_linears import WRONG_ERROR, is_wrong, median_ms, with_reference_ops  # noqa: E402

DEFAULT_SPLITS = [1, 2, 4, 8, 16, 32]


@dataclass
class Layer:
    """One quantized weight and what the sweep needs of its format's kernels."""

    dense: torch.Tensor  # the dequantized weight, for the bf16 baseline
    call: Callable[..., torch.Tensor]  # call(x, autotune=..., config=..., splits=...)
    kernels: Callable[[int], tuple[str, list]]  # M -> (kernel name, the configs the autotuner would try)
    split_of: Callable[[str, int, int | None], tuple[int, int]]  # (kernel, M, wanted) -> (splits, per split)
    op_path: Callable[[int], str]  # M -> what the op itself runs (the swept kernel, or cuBLAS + epilogue)
    reference: Callable[[torch.Tensor], torch.Tensor]  # x -> the op's plain-torch reference output


def _nf4_layer(weight: torch.Tensor) -> Layer:
    config = qpass.NF4Config(compute_dtype=torch.bfloat16)
    layout, t = quantize_weight(weight, config)
    n, k = weight.shape

    def call(x, **overrides):
        return linear_4bit_triton(x, t["weight"], t["quant_map"], t["absmax"], t["nested_absmax"],
                                  t["nested_quant_map"], t["offset"], None, n, k, config.blocksize,
                                  config.compute_dtype, **overrides)

    def split_of(kernel, m, wanted=None):
        return gemv_split(n, k, config.blocksize, wanted) if kernel == "gemv" else gemm_split(m, n, k, wanted)

    kernels = lambda m: _4bit_configs(m, k, config.blocksize, t["weight"])  # noqa: E731
    return Layer(layout.dequantize(t, torch.bfloat16), call, kernels, split_of, lambda m: kernels(m)[0],
                 _reference(layout, t))


def _reference(layout, tensors) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the layer's output through its op's plain-torch reference: what every swept config must give."""
    def reference(x):
        op, args = layout.linear_call(x, tensors, None)
        return with_reference_ops(op, *args)
    return reference


def _4bit_configs(m: int, k: int, blocksize: int, packed: torch.Tensor) -> tuple[str, list]:
    if gemv_applies(m, k, blocksize, packed):
        return "gemv", triton_4bit._gemv_configs()
    return "gemm", _tuner_candidates(triton_4bit._gemm_configs(), m)


def _tuner_candidates(configs: list, m: int) -> list:
    """The GEMM configs the autotuner times for M rows (its own pruning)."""
    return prune_gemm_configs(configs, {"M_BUCKET": m_bucket(m)})


def _int8_layer(weight: torch.Tensor) -> Layer:
    layout, t = quantize_weight(weight, qpass.Int8Config(compute_dtype=torch.bfloat16, threshold=6.0))
    n, k = weight.shape

    def call(x, **overrides):
        return linear_int8_triton(x, t["weight"], t["SCB"], None, 6.0, torch.bfloat16, **overrides)

    return Layer(layout.dequantize(t, torch.bfloat16), call,
                 lambda m: ("int8 gemm", _tuner_candidates(triton_int8._gemm_configs(), m)),
                 lambda kernel, m, wanted=None: gemm_split(m, n, k, wanted),
                 lambda m: "torch._int_mm + int8 epilogue" if int_mm_applies(m, n, k) else "int8 gemm",
                 _reference(layout, t))


LAYERS = {"nf4": _nf4_layer, "int8": _int8_layer}


def sweep(fmt: str, n: int, k: int, ms: list[int], splits: list[int], device: str,
          on_progress=lambda rows: None, match: str | None = None) -> list[dict]:
    """Rows of median times at each M; ``match`` (a regular expression) keeps only the configs whose
    text (``str(config)``) it finds, the bf16 and op's-choice rows always."""
    layer = LAYERS[fmt](torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02)
    cuda_graph = device == "cuda"
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        kernel, configs = layer.kernels(m)
        heuristic = layer.split_of(kernel, m, None)[0]
        bf16_ms = median_ms(lambda: F.linear(x, layer.dense), device, cuda_graph)
        rows.append({"M": m, "variant": "bf16 F.linear", "ms": bf16_ms})
        expected = layer.reference(x)
        tuned = device == "cuda"  # the interpreter has no benchmarker: it runs the first config
        # the first call tunes outside the timing (a CUDA graph cannot capture tuning)
        error = relative_error(layer.call(x, autotune=tuned), expected)
        path = layer.op_path(m)
        choice = f"op's choice ({path}, {'autotuned' if tuned else 'first config'}, {heuristic} splits)"
        rows.append({"M": m, "variant": choice, "kernel": path, "splits": heuristic, "error_vs_reference": error,
                     "ms": median_ms(lambda: layer.call(x, autotune=tuned), device, cuda_graph)})
        for candidate in (c for c in configs if match is None or re.search(match, str(c))):
            for split in sorted({*splits, heuristic}):
                if layer.split_of(kernel, m, split)[0] != split:  # more splits than K allows
                    continue
                error = relative_error(layer.call(x, config=candidate, splits=split), expected)
                ms_ = median_ms(lambda: layer.call(x, config=candidate, splits=split), device, cuda_graph)
                rows.append({"M": m, "variant": str(candidate), "kernel": kernel, "config": candidate.kwargs,
                             "num_warps": candidate.num_warps, "num_stages": candidate.num_stages, "splits": split,
                             "error_vs_reference": error, "ms": ms_})
            on_progress(rows)  # a call stopped at its time limit keeps every config timed so far
        timed = [r for r in rows if r["M"] == m and "kernel" in r]
        best = min(timed[1:], key=lambda r: r["ms"], default=None)
        best_text = (f"best {best['ms'] * 1e3:8.1f} us: {best['variant']}, {best['splits']} splits" if best
                     else "no config matched")
        if any(is_wrong(r["error_vs_reference"]) for r in timed):
            best_text += f" | WRONG RESULTS (error > {WRONG_ERROR}): see error_vs_reference in the rows"
        else:
            best_text += f" | largest error vs reference {max(r['error_vs_reference'] for r in timed):.1e}"
        print(f"M={m:<5} bf16 {bf16_ms * 1e3:8.1f} us | op's choice {timed[0]['ms'] * 1e3:8.1f} us | {best_text}",
              flush=True)
        on_progress(rows)
    return rows


def _shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=sorted(LAYERS), default="nf4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=_shape, default=(28672, 8192), help="N x K of the weight")
    parser.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 64, 128])
    parser.add_argument("--splits", type=lambda s: [int(v) for v in s.split(",")], default=DEFAULT_SPLITS)
    parser.add_argument("--match", default=None,
                        help="only the configs whose text matches this regular expression, e.g. \"SWAP_AB: True\"")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None, help="file name suffix (default: the device)")
    args = parser.parse_args(argv)
    if args.format == "nf4" and max(args.ms) >= DEQUANT_MATMUL_MIN_M:
        parser.error(f"--ms below {DEQUANT_MATMUL_MIN_M}: from there on the op dequantizes and calls cuBLAS, "
                     "which has no configs or splits to sweep (quantized_linears.py times it)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sweep_{args.format}_{args.tag or args.device}.json"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    n, k = args.shape

    def save(rows):
        path.write_text(json.dumps({"device": device_name, "format": args.format, "N": n, "K": k, "rows": rows},
                                   indent=2) + "\n")

    rows = sweep(args.format, n, k, args.ms, args.splits, args.device, on_progress=save, match=args.match)
    save(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
