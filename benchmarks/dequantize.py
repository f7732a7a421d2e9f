"""Decoding a whole quantized weight to bf16, side by side with bitsandbytes and torchao.

    python benchmarks/dequantize.py                      # GPU: the layer benchmark's four shapes
    python benchmarks/dequantize.py --device cpu         # CPU: 4096x4096 and 11008x4096
    python benchmarks/dequantize.py --shapes 28672x8192 --tag big

A whole weight is decoded by ``qpass.dequantize(model)``, by merging a LoRA adapter, and by the
backward of a layer whose weight is not decoded by blocks; bitsandbytes users call
``bitsandbytes.functional.dequantize_4bit`` for the same. For each N x K weight (bf16, random): the
median time of qpass (``QuantizedLinear.dequantize``, eager and compiled), bitsandbytes
(``functional.dequantize_4bit`` / ``int8_vectorwise_dequant``) and torchao (``NF4Tensor
.get_original_weight``, ``Int8Tensor.dequantize``), beside a plain copy of the bf16 weight (the memory
traffic of writing the result). Each result is checked: bitsandbytes' and qpass' decode the same bytes,
so they must be equal bit for bit (``equal_to_bitsandbytes``). Results go to
``results/dequantize_<tag>.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import qpass

sys.path.insert(0, str(Path(__file__).parent))
from quantized_linears import FULL_SHAPES, _linear_with, _peer, _shape, _versions, median_ms  # noqa: E402

CPU_SHAPES = [(4096, 4096), (11008, 4096)]


def _qpass(weight: torch.Tensor, fmt: str, compiled: bool) -> Callable[[], torch.Tensor]:
    layer = qpass.quantize(nn.Sequential(_linear_with(weight)), fmt)[0]
    decode = lambda: layer.dequantize(torch.bfloat16)  # noqa: E731
    return torch.compile(decode, dynamic=False) if compiled else decode


def _bitsandbytes(weight: torch.Tensor, fmt: str) -> Callable[[], torch.Tensor]:
    import bitsandbytes as bnb

    if fmt == "nf4":  # the layer benchmark's bnb nf4+dq: double-quantized, 64-weight blocks
        p = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                              quant_type="nf4")._quantize(weight.device)
        return lambda: bnb.functional.dequantize_4bit(p.data, p.quant_state)
    p = bnb.nn.Int8Params(weight.half().cpu(), requires_grad=False, has_fp16_weights=False)._quantize(weight.device)
    return lambda: bnb.functional.int8_vectorwise_dequant(p.data, p.SCB).to(torch.bfloat16)


def _torchao(weight: torch.Tensor, fmt: str) -> Callable[[], torch.Tensor]:
    if fmt == "nf4":
        try:
            from torchao.quantization import to_nf4  # torchao >= 0.18
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4  # torchao 0.17
        nf4 = to_nf4(weight)
        return nf4.get_original_weight
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = _linear_with(weight)
    quantize_(layer, Int8WeightOnlyConfig(version=2, set_inductor_config=False))
    return layer.weight.dequantize


def variants(weight: torch.Tensor) -> dict[str, Callable[[], torch.Tensor] | str]:
    """name -> a callable returning the bf16 weight, or why it does not run here."""
    out: dict[str, Callable[[], torch.Tensor] | str] = {"bf16 copy": weight.clone}
    for fmt in ("nf4", "int8"):
        out[f"qpass {fmt}"] = _peer(lambda: _qpass(weight, fmt, compiled=False))
        out[f"qpass {fmt} compiled"] = _peer(lambda: _qpass(weight, fmt, compiled=True))
        out[f"bnb {fmt}"] = _peer(lambda: _bitsandbytes(weight, fmt))
        out[f"torchao {fmt}"] = _peer(lambda: _torchao(weight, fmt))
    return out


def bench(device: str, shapes, on_progress=lambda rows: None) -> list[dict]:
    rows = []
    for n, k in shapes:
        weight = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        built = variants(weight)
        decoded = {name: fn() for name, fn in built.items() if not isinstance(fn, str)}
        for name, fn in built.items():
            row = {"N": n, "K": k, "variant": name}
            if isinstance(fn, str):
                row["skipped"] = fn
            else:
                row["ms"] = median_ms(fn, device)
                row["max_abs_error"] = (decoded[name].float() - weight.float()).abs().max().item()
                fmt = name.split()[1] if name.startswith("qpass") else None
                if fmt and f"bnb {fmt}" in decoded:
                    row["equal_to_bitsandbytes"] = torch.equal(decoded[name], decoded[f"bnb {fmt}"])
            rows.append(row)
            print(f"{n}x{k} {name:<22} " + (f"{row['ms']:9.3f} ms" if "ms" in row else row["skipped"]), flush=True)
        on_progress(rows)
    return rows


def markdown_table(rows: list[dict]) -> str:
    copy_ms = {(r["N"], r["K"]): r["ms"] for r in rows if r["variant"] == "bf16 copy" and "ms" in r}
    lines = ["| shape | variant | ms | x bf16 copy | max abs error | = bitsandbytes |", "|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['N']} x {r['K']}"
        if "ms" not in r:
            lines.append(f"| {shape} | {r['variant']} | {r['skipped']} | | | |")
            continue
        equal = {True: "yes", False: "NO", None: ""}[r.get("equal_to_bitsandbytes")]
        lines.append(f"| {shape} | {r['variant']} | {r['ms']:.3f} | {r['ms'] / copy_ms[r['N'], r['K']]:.1f} | "
                     f"{r['max_abs_error']:.2e} | {equal} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    torch._dynamo.config.recompile_limit = 64  # one compiled frame per shape and format
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=lambda s: [_shape(v) for v in s.split(",")],
                        help="N x K list, e.g. 4096x4096,28672x8192")
    parser.add_argument("--tag", help="names the result files dequantize_<tag>.*; default: the device")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    shapes = args.shapes or (FULL_SHAPES if args.device == "cuda" else CPU_SHAPES)
    tag = args.tag or args.device
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "versions": _versions(),
              "command": " ".join(["benchmarks/dequantize.py", *(sys.argv[1:] if argv is None else argv)])}

    def save(rows: list[dict]) -> None:
        (args.out / f"dequantize_{tag}.json").write_text(json.dumps({**report, "rows": rows}, indent=2) + "\n")

    rows = bench(args.device, shapes, on_progress=save)
    (args.out / f"dequantize_{tag}.md").write_text(
        f"Device: {report['device']}; {report['versions']}\n\n" + markdown_table(rows))
    print(f"wrote {args.out / f'dequantize_{tag}.json'}")
    return rows


if __name__ == "__main__":
    main()
