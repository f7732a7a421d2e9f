"""Host (Python) time of one eager qpass linear call: what an uncompiled model pays per layer on top of
its kernels. On a GPU this is the latency of a small layer: a 4096 x 4096 NF4 layer took 124 us eager
and 11 us replayed as a CUDA graph on an H100 (benchmarks/README.md), so in transformers' eager
``generate`` the host side, not the kernels, sets the pace.

    python benchmarks/host_overhead.py                 # this machine's CPU: kernel launches stubbed out
    python benchmarks/host_overhead.py --device cuda   # real launches (the layer is small enough that the
                                                       # GPU keeps up, so wall time per call is host time)

For NF4 (double quantization) and int8 (threshold 6.0), bf16 compute, M = 1 (``--ms``), a 4096 x 4096
layer (``--shape``):

- ``launcher``: the CUDA path's Python, ``linear_4bit_triton`` / ``linear_int8_triton`` called as the op
  calls them. Without a GPU the tensors are CPU tensors and each kernel launch returns at once:
  the launcher's own Python and torch calls (which on the CPU compute what they would launch on a
  GPU; at M = 1 that is a few KB), without Triton's launches or the op dispatch. On CUDA, with
  Triton's launches.
- on CUDA also ``op``, the ``torch.ops.qpass`` op called eagerly (dispatch included), and ``layer``, the
  ``QuantizedLinear`` called (on the CPU those run the CPU path, not the CUDA one).

Microseconds per call, the best of repeated loops, into ``results/host_overhead_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import qpass
from qpass.formats import Layout4bit


class _NoLaunch:
    """Stands in for ``wrap_triton(kernel)``: ``[grid](*args)`` returns at once, counted in ``launches``."""

    launches = 0

    def __init__(self, kernel):
        pass

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _NoLaunch.launches += 1

        return launch


def best_us(fn: Callable[[], object], device: str, calls: int = 200, loops: int = 15) -> float:
    """The least, over ``loops``, wall time per call of ``calls`` calls (one synchronization per loop):
    as ``timeit`` reports, since a busy machine only ever adds time."""
    for _ in range(calls):
        fn()
    per_call = []
    for _ in range(loops):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return min(per_call)


def _launcher(layer: qpass.QuantizedLinear, x: torch.Tensor, device: str) -> Callable[[], object]:
    from qpass.kernels.triton_4bit import linear_4bit_triton
    from qpass.kernels.triton_int8 import linear_int8_triton

    launch = torch.library.wrap_triton if device == "cuda" else _NoLaunch
    _, args = layer.layout.linear_call(x, layer.quantized_tensors, layer.bias)
    if isinstance(layer.layout, Layout4bit):
        x2d, *tensors, bias, n, k, blocksize, _, dtype = args
        return lambda: linear_4bit_triton(x2d, *tensors, bias, n, k, blocksize, dtype, launch=launch)
    x2d, cb, scb, bias, threshold, dtype = args
    return lambda: linear_int8_triton(x2d, cb, scb, bias, threshold, dtype, launch=launch)


def run(device: str, shape: tuple[int, int], ms: list[int], calls: int) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for fmt in ("nf4", "int8"):
        layer = qpass.quantize(nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)), fmt).to(device)[0]
        for m in ms:
            x = torch.randn(m, shape[1], dtype=torch.bfloat16, device=device)
            with torch.no_grad():
                launcher = _launcher(layer, x, device)
                row = {"format": fmt, "shape": f"{shape[0]}x{shape[1]}", "M": m,
                       "launcher_us": best_us(launcher, device, calls)}
                if device == "cpu":  # Triton launches per call
                    _NoLaunch.launches = 0
                    launcher()
                    row["kernel_launches"] = _NoLaunch.launches
                if device == "cuda":
                    op, args = layer.layout.linear_call(x, layer.quantized_tensors, layer.bias)
                    row["op_us"] = best_us(lambda: op(*args), device, calls)
                    row["layer_us"] = best_us(lambda: layer(x), device, calls)
            rows.append(row)
            print(f"{fmt:5s} M={m:<3d} " + "   ".join(f"{k[:-3]} {v:7.1f} us" for k, v in row.items()
                                                      if k.endswith("_us"))
                  + (f"   ({row['kernel_launches']} kernel launches)" if "kernel_launches" in row else ""))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="4096x4096", help="the layer's out x in features")
    parser.add_argument("--ms", default="1", help="rows of input, comma-separated")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed loop")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    rows = run(args.device, shape, [int(m) for m in args.ms.split(",")], args.calls)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "rows": rows}
    out = Path(args.out) / f"host_overhead_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
