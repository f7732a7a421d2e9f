"""Time every 4-bit kernel config and K-split count on one weight, untuned, next to the op's own choice
and bf16: the data for choosing the autotune configs and the split heuristics (``GEMV_TARGET_PROGRAMS``
in ``kernels/triton_4bit.py``, ``GEMM_TARGET_PROGRAMS`` in ``kernels/triton_common.py``).

    python benchmarks/sweep_4bit.py --shape 28672x8192 --ms 1,16,64,128 --out results
    python benchmarks/sweep_4bit.py --device cpu --shape 64x256 --ms 1,16 --splits 1,2  # interpreter smoke run

M = 1 sweeps the GEMV's configs, larger M the GEMM's (those the autotuner would consider for that M).
On CUDA each variant is timed as a replayed CUDA graph (no launch overhead), so the split-K reduction
counts but Python does not. Rows go to ``sweep_4bit_<tag>.json``, rewritten after every M.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import qpass
from qpass.formats import quantize_weight
from qpass.kernels import triton_4bit
from qpass.kernels.triton_4bit import DEQUANT_MATMUL_MIN_M, gemv_applies, gemv_split, linear_4bit_triton
from qpass.kernels.triton_common import gemm_split, m_bucket, prune_gemm_configs

sys.path.insert(0, str(Path(__file__).parent))
from quantized_linears import median_ms  # noqa: E402

DEFAULT_SPLITS = [1, 2, 4, 8, 16, 32]


def _configs(m: int, k: int, blocksize: int, packed: torch.Tensor):
    if gemv_applies(m, k, blocksize, packed):
        return "gemv", triton_4bit._gemv_configs()
    return "gemm", prune_gemm_configs(triton_4bit._gemm_configs(), {"M_BUCKET": m_bucket(m)})


def sweep(n: int, k: int, ms: list[int], splits: list[int], device: str, on_progress=lambda rows: None) -> list[dict]:
    config = qpass.NF4Config(compute_dtype=torch.bfloat16)  # double quantization, as the target
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    layout, t = quantize_weight(weight, config)
    dense = layout.dequantize(t, torch.bfloat16)
    cuda_graph = device == "cuda"
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)

        def call(**overrides):
            return linear_4bit_triton(
                x, t["weight"], t["quant_map"], t["absmax"], t["nested_absmax"], t["nested_quant_map"], t["offset"],
                None, n, k, config.blocksize, config.compute_dtype, **overrides)

        kernel, configs = _configs(m, k, config.blocksize, t["weight"])
        heuristic = gemv_split(n, k, config.blocksize)[0] if kernel == "gemv" else gemm_split(m, n, k)[0]
        bf16_ms = median_ms(lambda: F.linear(x, dense), device, cuda_graph)
        rows.append({"M": m, "variant": "bf16 F.linear", "ms": bf16_ms})
        tuned = device == "cuda"  # the interpreter has no benchmarker: it runs the first config
        call(autotune=tuned)  # tunes outside the timing (a CUDA graph cannot capture tuning)
        choice = f"op's choice ({'autotuned' if tuned else 'first config'}, {heuristic} splits)"
        rows.append({"M": m, "variant": choice, "kernel": kernel, "splits": heuristic,
                     "ms": median_ms(lambda: call(autotune=tuned), device, cuda_graph)})
        for candidate in configs:
            for split in sorted({*splits, heuristic}):
                split_of = gemv_split(n, k, config.blocksize, split) if kernel == "gemv" else gemm_split(m, n, k, split)
                if split_of[0] != split:  # more splits than K allows
                    continue
                ms_ = median_ms(lambda: call(config=candidate, splits=split), device, cuda_graph)
                rows.append({"M": m, "variant": str(candidate), "kernel": kernel, "config": candidate.kwargs,
                             "num_warps": candidate.num_warps, "num_stages": candidate.num_stages, "splits": split,
                             "ms": ms_})
        timed = [r for r in rows if r["M"] == m and "kernel" in r]
        best = min(timed[1:], key=lambda r: r["ms"])
        print(f"M={m:<5} bf16 {bf16_ms * 1e3:8.1f} us | op's choice {timed[0]['ms'] * 1e3:8.1f} us | "
              f"best {best['ms'] * 1e3:8.1f} us: {best['variant']}, {best['splits']} splits", flush=True)
        on_progress(rows)
    return rows


def _shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=_shape, default=(28672, 8192), help="N x K of the weight")
    parser.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 64, 128])
    parser.add_argument("--splits", type=lambda s: [int(v) for v in s.split(",")], default=DEFAULT_SPLITS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None, help="file name suffix (default: the device)")
    args = parser.parse_args(argv)
    if max(args.ms) >= DEQUANT_MATMUL_MIN_M:
        parser.error(f"--ms below {DEQUANT_MATMUL_MIN_M}: from there on the op dequantizes and calls cuBLAS, "
                     "which has no configs or splits to sweep (quantized_linears.py times it)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sweep_4bit_{args.tag or args.device}.json"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    n, k = args.shape

    def save(rows):
        path.write_text(json.dumps({"device": device_name, "N": n, "K": k, "rows": rows}, indent=2) + "\n")

    rows = sweep(n, k, args.ms, args.splits, args.device, on_progress=save)
    save(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
