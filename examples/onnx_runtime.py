"""SmolLM2-135M in NF4 (or int8) exported to ONNX and run by ONNX Runtime, against the same model in qpass.

    python examples/onnx_runtime.py       # NF4; --format int8, --windows N, --out DIR, --optimize, --sensitivity
    python examples/onnx_runtime.py --with-past   # the graph with KV cache: also greedy generation in both

The 4-bit layers become ONNX Runtime's ``com.microsoft.MatMulBnb4`` over the bitsandbytes bytes, int8
layers standard ONNX operators (``qpass.integrations.onnx``). The layers compute in float32, the dtype
ONNX Runtime's CPU provider runs ``MatMulBnb4`` in. Prints the file size, the largest logit difference,
and perplexity and seconds over 512-token windows of CPython's pydoc text for both runtimes; with
``--with-past``, the graph with KV cache (``export_causal_lm(..., with_past=True)``) scores the windows
with an empty past and also generates greedily from a prompt, token by token (``generate_greedy``),
beside transformers' ``generate`` of the qpass model. Offline, like the demo.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import onnxruntime
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import qpass
from qpass.evaluation import perplexity, pydoc_text
from qpass.integrations.onnx_causal_lm import (CausalLMLogits, empty_past, export_causal_lm, generate_greedy,
                                              position_ids_for)
from qpass.integrations.smollm2 import smollm2_checkpoint

WINDOW = 512
PROMPT = "The capital of France is"


class OnnxRuntimeLM(nn.Module):
    """An ONNX Runtime session behind the ``model(ids).logits`` interface ``qpass.evaluation`` scores; the
    graph with KV cache gets an unpadded mask and an empty past."""

    def __init__(self, path: Path):
        super().__init__()
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.with_past = any(i.name.startswith("past_key_values.") for i in self.session.get_inputs())

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        feed = {"input_ids": ids.numpy()}
        if self.with_past:
            mask = torch.ones_like(ids)
            feed.update(attention_mask=mask.numpy(), position_ids=position_ids_for(mask, ids.shape[1]).numpy())
            feed.update(empty_past(self.session, ids.shape[0]))
        logits = self.session.run(None, feed)[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))


def timed_perplexity(model: nn.Module, tokens: torch.Tensor, windows: int) -> tuple[float, float]:
    started = time.perf_counter()
    return perplexity(model, tokens, window=WINDOW, max_windows=windows), time.perf_counter() - started


@torch.no_grad()
def perturbed(lm: nn.Module, ids: torch.Tensor, tokens: torch.Tensor, windows: int) -> tuple[float, float]:
    """The model's own sensitivity, the yardstick for the ONNX differences: the largest logit change and
    the perplexity after the input embeddings are scaled by 1 + 1e-7 * N(0, 1) (then restored)."""
    embedding = lm.get_input_embeddings().weight
    saved = embedding.clone()
    before = lm(input_ids=ids).logits
    embedding.mul_(1 + 1e-7 * torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0)))
    change = (lm(input_ids=ids).logits - before).abs().max().item()
    result = change, perplexity(lm, tokens, window=WINDOW, max_windows=windows)
    embedding.copy_(saved)
    return result


@torch.no_grad()
def timed_generation(lm: nn.Module, session, tokenizer, new_tokens: int) -> dict:
    """Greedy generation of up to ``new_tokens`` from ``PROMPT``, stopping at the end-of-sequence token, by
    transformers' ``generate`` of the qpass model and by ``generate_greedy`` on the ONNX Runtime session."""
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    started = time.perf_counter()
    want = lm.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    qpass_seconds = time.perf_counter() - started
    started = time.perf_counter()
    got = generate_greedy(session, prompt.numpy(), max_new_tokens=new_tokens, eos_token_id=eos)
    onnx_seconds = time.perf_counter() - started
    made = got.shape[1] - prompt.shape[1]
    ours, theirs = want[0, prompt.shape[1]:].tolist(), got[0, prompt.shape[1]:].tolist()
    agreeing = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {"same_tokens": ours == theirs, "agreeing_tokens": agreeing, "new_tokens": made,
            "onnx_text": tokenizer.decode(theirs), "qpass_text": tokenizer.decode(ours),
            "qpass_tokens_per_second": (want.shape[1] - prompt.shape[1]) / qpass_seconds,
            "onnx_tokens_per_second": made / onnx_seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=["nf4", "fp4", "int8"], default="nf4")
    parser.add_argument("--windows", type=int, default=4, help=f"{WINDOW}-token windows of pydoc text to score")
    parser.add_argument("--out", type=Path, help="folder for the .onnx files (default: a temporary one)")
    parser.add_argument("--optimize", action="store_true", help="run torch.onnx's graph optimizer (slow on big graphs)")
    parser.add_argument("--with-past", action="store_true",
                        help="export the graph with KV cache and also generate greedily in both runtimes")
    parser.add_argument("--new-tokens", type=int, default=32, help="most tokens generated with --with-past")
    parser.add_argument("--sensitivity", action="store_true",
                        help="also score qpass with its embeddings perturbed by 1e-7 relative (see perturbed)")
    args = parser.parse_args(argv)

    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokens = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    config = {"nf4": qpass.NF4Config, "fp4": qpass.FP4Config, "int8": qpass.Int8Config}[args.format]
    lm = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model = CausalLMLogits(qpass.quantize(lm, config(compute_dtype=torch.float32))).eval()

    with tempfile.TemporaryDirectory() as scratch:
        path = (args.out or Path(scratch)) / f"smollm2-{args.format}.onnx"
        started = time.perf_counter()
        program = export_causal_lm(lm, path, with_past=args.with_past, optimize=args.optimize)
        export_seconds = time.perf_counter() - started
        graph_bytes = path.stat().st_size  # the graph, its small constants and names
        data_bytes = sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))  # the tensors
        runtime = OnnxRuntimeLM(path)
        ids = tokens[:WINDOW].unsqueeze(0)
        with torch.no_grad():
            difference = (runtime(ids).logits - model(ids)).abs().max().item()
        qpass_ppl, qpass_seconds = timed_perplexity(lm, tokens, args.windows)
        onnx_ppl, onnx_seconds = timed_perplexity(runtime, tokens, args.windows)
        if args.with_past:
            generated = timed_generation(lm, runtime.session, tokenizer, args.new_tokens)

    ops = sorted({node.op_type for node in program.model.graph if node.domain == "com.microsoft"})
    result = {
        "format": args.format, "optimize": args.optimize, "with_past": args.with_past, "export_seconds": export_seconds,
        "onnx_graph_bytes": graph_bytes, "onnx_data_bytes": data_bytes,
        "qpass_bytes": qpass.footprint(lm).total_bytes, "max_logit_difference": difference,
        "qpass_perplexity": qpass_ppl, "onnx_perplexity": onnx_ppl,
        "qpass_seconds": qpass_seconds, "onnx_seconds": onnx_seconds,
    }
    optimized = ", graph optimized" if args.optimize else ""
    print(f"SmolLM2-135M-Instruct, {args.format}, float32 compute; exported{optimized} in {export_seconds:.0f} s "
          f"(contrib operators: {', '.join(ops) or 'none'})")
    print(f"  size: ONNX tensors {data_bytes / 2**20:.1f} MiB (+ {graph_bytes / 2**20:.1f} MiB graph file), "
          f"qpass model {result['qpass_bytes'] / 2**20:.1f} MiB")
    print(f"  largest logit difference over {WINDOW} tokens: {difference:.2e}")
    print(f"  perplexity over {args.windows} x {WINDOW} tokens: qpass {qpass_ppl:.3f} ({qpass_seconds:.1f} s), "
          f"ONNX Runtime {onnx_ppl:.3f} ({onnx_seconds:.1f} s)")
    if args.with_past:
        result.update(generated)
        same = ("the same tokens" if generated["same_tokens"] else
                f"DIFFERENT tokens after the first {generated['agreeing_tokens']}")
        print(f"  greedy generation of {generated['new_tokens']} tokens after {PROMPT!r}: {same}; qpass "
              f"{generated['qpass_tokens_per_second']:.1f} tokens/s, ONNX Runtime "
              f"{generated['onnx_tokens_per_second']:.1f} tokens/s")
        print(f"    ONNX Runtime: {generated['onnx_text']!r}")
        if not generated["same_tokens"]:
            print(f"    qpass:        {generated['qpass_text']!r}")
    if args.sensitivity:
        result["perturbed_logit_change"], result["perturbed_perplexity"] = perturbed(lm, ids, tokens, args.windows)
        print(f"  qpass with its embeddings scaled by 1 + 1e-7 * N(0, 1): largest logit change "
              f"{result['perturbed_logit_change']:.2e}, perplexity {result['perturbed_perplexity']:.3f}")
    return result


if __name__ == "__main__":
    main()
