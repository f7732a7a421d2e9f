"""Quantized linear layers side by side with bf16, bitsandbytes and torchao, plus end-to-end decode.

    python benchmarks/quantized_linears.py            # GPU: the issue's shapes, M in {1, 16, 128, 2048}
    python benchmarks/quantized_linears.py --device cpu --quick  # CPU: small shapes (what CI runs)
    python benchmarks/quantized_linears.py --part layers --shapes 28672x8192 --ms 1,16 --tag big

A lent GPU gives 10 minutes per command: ``--part``, ``--shapes`` and ``--ms`` split the run, and the
JSON is rewritten after every shape and every decode run, so a run stopped at its limit keeps what it
measured.

One process, the same inputs for every variant. For each (N x K weight, M rows of input): the median
time, the speedup over bf16 ``F.linear``, and the fraction of the limit
``max(bytes / bandwidth, 2*M*N*K / peak)`` reached, with the bandwidth (device-to-device copy) and the
bf16 matmul peak measured in the same run. Each variant's output is also checked, so that no time
is reported for a wrong result: its relative error against the unquantized bf16 layer computed in
float64 (the format's own error, on one scale for every library), and for qpass against its plain-torch
reference op on the same weights (the kernels' own error: about the compute dtype's rounding). Then a
Llama-3-8B-shaped ``LlamaForCausalLM`` (random
weights; a tiny one with --quick) decodes with a static KV cache, compiled: tokens/s at batch 1 and 16
and peak memory. Results go to a JSON file, a Markdown table and a PNG plot (speedup vs M per shape).
Peers that are not installed or do not run on the device are recorded as such, not silently dropped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import qpass
from qpass.evaluation import relative_error
from qpass.kernels.ops import reference_kernels

sys.path.insert(0, str(Path(__file__).parent))
from peers import bitsandbytes_4bit  # noqa: E402

FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]
QUICK_SHAPES = [(256, 256), (512, 256)]
FULL_M = [1, 16, 128, 2048]
QUICK_M = [1, 16, 64]
QUICK_E2E_TOKENS = 6


# ---------------------------------------------------------------------------------------------------
# timing and ceilings
# ---------------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], device: str, cuda_graph: bool = False) -> float:
    """Median wall time of ``fn`` in ms: triton.testing.do_bench (CUDA events) on GPU, a timer on CPU."""
    if device == "cuda":
        import triton.testing

        if cuda_graph:
            return triton.testing.do_bench_cudagraph(fn, return_mode="median")
        return triton.testing.do_bench(fn, return_mode="median")
    for _ in range(2):
        fn()
    times = []
    deadline = time.perf_counter() + 0.25
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: str, quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate on this device."""
    n = (1 << 24) if quick else (1 << 30)  # elements of the copied buffer
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device)
    size = 512 if quick else 8192
    rates = {}
    # On CPUs without bf16 arithmetic the float32 matmul is the faster one (and what qpass' reference
    # uses), so the compute ceiling there is the better of the two.
    for dtype in (torch.bfloat16,) if device == "cuda" else (torch.bfloat16, torch.float32):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        rates[dtype] = 2 * size**3 / (median_ms(lambda: a @ b, device) * 1e-3)
    return {"bandwidth_bytes_per_s": 2 * n / (copy_ms * 1e-3), "matmul_flops_per_s": max(rates.values()),
            "bf16_flops_per_s": rates[torch.bfloat16]}


# ---------------------------------------------------------------------------------------------------
# variants of one linear layer
# ---------------------------------------------------------------------------------------------------


def _peer(make: Callable[[], Callable]) -> Callable | str:
    """A peer's layer, or why it cannot be built here: a result, not a crash (torchao's double-quantized
    NF4, for one, needs a multiple of 64 x 256 weights)."""
    try:
        return make()
    except Exception as err:
        return f"does not run here: {type(err).__name__}: {str(err)[:120]}"


def _torchao_variants(weight: torch.Tensor) -> dict[str, Callable | str]:
    """torchao's NF4 (``to_nf4``: double-quantized, 64-element blocks, as QLoRA) and its int8 and int4
    weight-only configs, each eager and compiled (torchao's own advice: its speed is under
    ``torch.compile``). int4 takes the tinygemm layout (``tile_packed_to_4d``: torch's own
    ``_weight_int4pack_mm``, CUDA only), not the default that needs the separate mslk kernels. The
    configs are told not to set Inductor options (``set_inductor_config=False``): torchao's setter
    changes process-wide state (torchao 0.17 also ``torch.set_float32_matmul_precision("high")``),
    which would change how every compiled variant after it is built, qpass' included."""
    try:
        import torchao  # noqa: F401
    except ImportError as err:
        return {"torchao": f"not installed ({err.name})"}
    try:
        from torchao.quantization import to_nf4  # torchao >= 0.18
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4  # torchao 0.17
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    def nf4():
        nf4_weight = to_nf4(weight)
        return lambda x: nn.functional.linear(x, nf4_weight)

    def weight_only(config):
        def build():
            layer = _linear_with(weight)
            quantize_(layer, config)
            return layer
        return build

    built = {"torchao nf4": _peer(nf4),
             "torchao int8 w-only": _peer(weight_only(Int8WeightOnlyConfig(version=2, set_inductor_config=False))),
             "torchao int4 w-only": _peer(weight_only(Int4WeightOnlyConfig(
                 group_size=64, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)))}
    out: dict[str, Callable | str] = {}
    for name, fn in built.items():
        out[name] = fn
        out[f"{name} compiled"] = fn if isinstance(fn, str) else torch.compile(fn, dynamic=False)
    return out


def _bitsandbytes_variants(weight: torch.Tensor) -> dict[str, Callable | str]:
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        return {"bitsandbytes": f"not installed ({err.name})"}
    n, k = weight.shape

    def nf4():
        return bitsandbytes_4bit(nn.Sequential(_linear_with(weight)), "nf4", double_quant=True, skip=())[0]

    def int8():
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight.half().cpu(), requires_grad=False,
                                         has_fp16_weights=False)._quantize(weight.device)
        return layer.eval()

    return {"bnb nf4+dq": _peer(nf4), "bnb int8 (t=6)": _peer(int8)}


def layer_variants(weight: torch.Tensor, device: str) -> dict[str, Callable | str]:
    """name -> a callable taking x, or a string saying why that variant does not run."""
    variants: dict[str, Callable | str] = {"bf16": lambda x: nn.functional.linear(x, weight)}
    for fmt in ("nf4", "fp4", "int8"):
        layer = qpass.quantize(_linear_with(weight), fmt)
        variants[f"qpass {fmt}"] = layer
        # static shapes: each M gets its own graph and tuning, as a serving stack compiles per batch size.
        # On CUDA the compiled layer is timed as a replayed CUDA graph: GPU time,
        # not Python launch overhead, which a serving stack's graphs remove too.
        variants[f"qpass {fmt} compiled"] = torch.compile(layer, fullgraph=True, dynamic=False)
    if device == "cuda":  # each format's other path around its switch to cuBLAS, to place the switch
        for name, switched in SWITCHED.items():
            variants[name] = _with_switch(variants[f"qpass {switched.fmt}"], switched)
    variants.update(_bitsandbytes_variants(weight))
    variants.update(_torchao_variants(weight))
    return variants


@dataclass(frozen=True)
class Switched:
    """A qpass layer on the other side of its format's switch to cuBLAS (``module.switch`` rows)."""

    fmt: str
    module: str  # the kernel module under qpass.kernels
    switch: str  # its constant: from this many rows on, cuBLAS multiplies
    forced: int  # the value the variant sets for its call

    def kernels(self):
        return importlib.import_module(f"qpass.kernels.{self.module}")

    def differs_at(self, m: int) -> bool:
        """Whether the forced switch takes another path than the op's own at M rows. cuBLAS only above
        16 rows (torch._int_mm's floor; below, the GEMV and the split-K GEMM are the point)."""
        current = getattr(self.kernels(), self.switch)
        return (m >= current) != (m >= self.forced) and m > 16


# nf4 dequantizes the weight and lets cuBLAS multiply from DEQUANT_MATMUL_MIN_M rows on; int8 lets
# torch._int_mm multiply and runs only its kernel's epilogue from INT_MM_MIN_M on. Each variant here
# takes the other path at the M where it differs from the op's, to place those switches.
SWITCHED = {
    "qpass nf4 fused GEMM": Switched("nf4", "triton_4bit", "DEQUANT_MATMUL_MIN_M", 1 << 62),
    "qpass nf4 via cuBLAS": Switched("nf4", "triton_4bit", "DEQUANT_MATMUL_MIN_M", 0),
    "qpass int8 fused GEMM": Switched("int8", "triton_int8", "INT_MM_MIN_M", 1 << 62),
    "qpass int8 via cuBLAS": Switched("int8", "triton_int8", "INT_MM_MIN_M", 0),
}


def _with_switch(layer: nn.Module, switched: Switched) -> Callable:
    """``layer`` with ``switched.forced`` as its switch during each call (eager: read at each call)."""
    kernels = switched.kernels()

    def run(x):
        saved = getattr(kernels, switched.switch)
        setattr(kernels, switched.switch, switched.forced)
        try:
            return layer(x)
        finally:
            setattr(kernels, switched.switch, saved)
    return run


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    return layer


def weight_bytes(name: str, n: int, k: int) -> float:
    if "int8" in name:
        return n * k + 4 * n
    if any(f in name for f in ("nf4", "fp4", "int4")):
        return n * k * 4.127 / 8
    return 2 * n * k


QPASS_FORMATS = ("nf4", "fp4", "int8")

# A qpass output further than this from its reference op's (relative, over the whole output) is wrong,
# not rounded differently: correct kernels stay within about two bf16 roundings (the kernel tests hold
# them to 8e-3 on a GPU, 1.5e-2 under the interpreter).
WRONG_ERROR = 1.5e-2


def is_wrong(error_vs_reference: float) -> bool:
    """Whether a kernel's relative error against its reference op says it computed something else (NaN too)."""
    return not error_vs_reference <= WRONG_ERROR


def with_reference_ops(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)`` (a qpass layer, or one of the ``torch.ops.qpass`` ops) computed by the ops' plain-torch
    reference, as on the CPU, on the arguments' own device: the result the Triton kernels are held to."""
    with reference_kernels(), torch.no_grad():
        return fn(*args)


def qpass_format(variant: str) -> str | None:
    """The qpass format a variant runs ("qpass nf4 compiled" -> "nf4"), None for bf16 and the peers."""
    words = variant.split()
    return words[1] if words[0] == "qpass" else None


def bench_layers(device: str, shapes, ms, ceilings, on_progress=lambda rows: None) -> list[dict]:
    rows = []
    for n, k in shapes:
        weight = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        variants = layer_variants(weight, device)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            x16 = x.half()
            unquantized = nn.functional.linear(x.double(), weight.double())
            references = {fmt: with_reference_ops(variants[f"qpass {fmt}"], x) for fmt in QPASS_FORMATS}
            base = None
            for name, fn in variants.items():
                row = {"N": n, "K": k, "M": m, "variant": name}
                if isinstance(fn, str):
                    rows.append({**row, "skipped": fn})
                    continue
                if name in SWITCHED and not SWITCHED[name].differs_at(m):
                    rows.append({**row, "skipped": f"the same path as qpass {SWITCHED[name].fmt} at this M"})
                    continue
                inp = x16 if name.startswith("bnb int8") else x
                try:
                    with torch.no_grad():
                        out = fn(inp)
                        errors = {"error_vs_unquantized": relative_error(out, unquantized)}
                        if qpass_format(name):
                            errors["error_vs_reference"] = relative_error(out, references[qpass_format(name)])
                        del out
                        t = median_ms(lambda: fn(inp), device, cuda_graph=name.endswith(" compiled"))
                except Exception as err:  # a peer failing at one shape is recorded, the run goes on
                    rows.append({**row, "skipped": f"failed: {type(err).__name__}: {str(err)[:120]}"})
                    continue
                base = t if name == "bf16" else base
                moved = weight_bytes(name, n, k) + 2 * m * (n + k)
                flops = 2 * m * n * k
                limit_ms = max(moved / ceilings["bandwidth_bytes_per_s"], flops / ceilings["matmul_flops_per_s"]) * 1e3
                rows.append({**row, "ms": t, "speedup_vs_bf16": base / t if base else None,
                             "fraction_of_limit": limit_ms / t, **errors})
                print(f"{n:>6}x{k:<6} M={m:<5} {name:<22} {t:9.4f} ms  x{(base or t) / t:5.2f}  "
                      f"{100 * limit_ms / t:5.1f}% of limit  error {_errors_text(errors)}", flush=True)
            on_progress(rows)  # per M: a device call cut off at its time limit keeps what it timed
        del variants
    return rows


# ---------------------------------------------------------------------------------------------------
# end to end decode
# ---------------------------------------------------------------------------------------------------


def llama(device: str, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:  # Llama-3-8B shapes
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an 8B model in float32 would take 32 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def decode_tokens_per_s(model, batch: int, device: str, prompt_len: int, new_tokens: int) -> float:
    """Tokens per second of compiled decode steps (one token per sequence) after a prompt of
    ``prompt_len`` random tokens. The prompt goes through the same compiled step, one token at a time
    (the first steps compile and on CUDA record the graph), so the layers only ever see batch-many
    rows, and nothing compiles or tunes kernels for a prefill shape the timing never uses. The static
    cache is allocated up front, so no eager step is needed to create it (one would also autotune
    every Triton kernel once more, outside Inductor)."""
    from transformers import StaticCache

    config = model.config
    cache = StaticCache(config=config, max_cache_len=prompt_len + new_tokens)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache.early_initialization(batch, config.num_key_value_heads, head_dim, model.dtype, torch.device(device))

    def step(token, position):
        return model(token, past_key_values=cache, cache_position=position, use_cache=True).logits[:, -1]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    compiled = torch.compile(step, mode="reduce-overhead" if device == "cuda" else None, fullgraph=True)
    with torch.no_grad():
        started = time.perf_counter()
        for position in range(prompt_len):  # fresh [batch, 1] tokens, like argmax's: a slice would recompile
            token = torch.randint(0, config.vocab_size, (batch, 1), device=device)
            logits = compiled(token, torch.tensor([position], device=device))
        sync()
        print(f"  prompt of {prompt_len} tokens, compile included: {time.perf_counter() - started:.1f} s", flush=True)
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        for position in range(prompt_len, prompt_len + new_tokens):
            token = compiled(token, torch.tensor([position], device=device)).argmax(-1, keepdim=True)
        sync()
    return batch * new_tokens / (time.perf_counter() - start)


def peak_memory_bytes(device: str) -> int | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process-wide: indicative only


E2E_VARIANTS = ("bf16", "qpass nf4", "qpass int8", "bnb nf4+dq")


def bench_end_to_end(device: str, quick: bool, on_progress=lambda rows: None, variants=E2E_VARIANTS,
                     batches=(1, 16)) -> list[dict]:
    rows = []
    new_tokens = QUICK_E2E_TOKENS if quick else 64
    for name in variants:
        for batch in batches:
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            model = llama(device, quick)
            try:
                if name.startswith("qpass"):
                    qpass.quantize(model, name.split()[1])
                elif name.startswith("bnb"):
                    bitsandbytes_4bit(model, "nf4", double_quant=True)
                built = time.perf_counter() - started
                print(f"decode {name} batch {batch}: model built and quantized in {built:.1f} s", flush=True)
                tps = decode_tokens_per_s(model, batch, device, prompt_len=4 if quick else 16, new_tokens=new_tokens)
            except Exception as err:
                reason = f"failed: {type(err).__name__}: {str(err)[:160]}"
                rows.append({"variant": name, "batch": batch, "skipped": reason})
                on_progress(rows)
                continue
            finally:
                del model
            rows.append({"variant": name, "batch": batch, "tokens_per_s": tps,
                         "peak_memory_bytes": peak_memory_bytes(device)})
            print(f"decode {name:<12} batch {batch:>2}: {tps:9.1f} tok/s", flush=True)
            on_progress(rows)
    return rows


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------


def _errors_text(row: dict) -> str:
    """The row's relative errors: against the unquantized layer, then (qpass) against the reference op."""
    text = f"{row['error_vs_unquantized']:.1e}"
    if "error_vs_reference" in row:
        text += f" / {row['error_vs_reference']:.1e}" + (" WRONG" if is_wrong(row["error_vs_reference"]) else "")
    return text


def markdown_table(rows: list[dict]) -> str:
    lines = ["| N x K | M | variant | ms | speedup vs bf16 | % of limit | error vs unquantized / vs reference |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" in r:
            lines.append(f"| {r['N']} x {r['K']} | {r['M']} | {r['variant']} | {r['ms']:.4f} | "
                         f"{r['speedup_vs_bf16']:.2f} | {100 * r['fraction_of_limit']:.0f}% | {_errors_text(r)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["N"], r["K"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        for variant in sorted({r["variant"] for r in rows if "ms" in r and r["variant"] != "bf16"}):
            points = sorted((r["M"], r["speedup_vs_bf16"]) for r in rows
                            if r.get("variant") == variant and (r["N"], r["K"]) == (n, k) and "ms" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set(xscale="log", yscale="log", title=f"{n} x {k}", xlabel="M", ylabel="speedup vs bf16")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def main(argv=None) -> dict:
    # Every compiled layer variant is its own frame; the default limit of 8 recompiles would make the
    # later ones fall back to eager and time the wrong thing.
    torch._dynamo.config.recompile_limit = 256
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and a tiny model (CPU, CI)")
    parser.add_argument("--part", choices=["all", "layers", "e2e"], default="all")
    parser.add_argument("--shapes", type=lambda s: [_shape(v) for v in s.split(",")],
                        help="N x K list, e.g. 4096x4096,28672x8192")
    parser.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], help="rows of x, e.g. 1,16")
    parser.add_argument("--e2e-variants", type=lambda s: s.split(","), default=list(E2E_VARIANTS),
                        help=f"decode variants, from {','.join(E2E_VARIANTS)}")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16])
    parser.add_argument("--tag", help="names the result files kernels_<tag>.*; default: the device")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    quick = args.quick or args.device == "cpu"
    tag = args.tag or ("cuda" if args.device == "cuda" else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)

    ceilings = measure_ceilings(args.device, quick)
    print(f"ceilings: {ceilings['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s copy, "
          f"{ceilings['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s matmul "
          f"({ceilings['bf16_flops_per_s'] / 1e12:.2f} bf16)")
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "versions": _versions(),
        "command": " ".join(["benchmarks/quantized_linears.py", *(sys.argv[1:] if argv is None else argv)]),
        "ceilings": ceilings,
        "layers": [],
        "end_to_end": [],
    }

    def save(section: str):
        def update(rows: list[dict]) -> None:
            report[section] = rows
            (args.out / f"kernels_{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
        return update

    if args.part in ("all", "layers"):
        shapes = args.shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
        ms = args.ms or (QUICK_M if quick else FULL_M)
        bench_layers(args.device, shapes, ms, ceilings, on_progress=save("layers"))
        (args.out / f"kernels_{tag}.md").write_text(
            f"Device: {report['device']}; {report['versions']}\n\n" + markdown_table(report["layers"]))
        plot(report["layers"], args.out / f"kernels_{tag}.png")
    if args.part in ("all", "e2e"):
        unknown = set(args.e2e_variants) - set(E2E_VARIANTS)
        if unknown:
            parser.error(f"unknown --e2e-variants {sorted(unknown)}; choose from {', '.join(E2E_VARIANTS)}")
        bench_end_to_end(args.device, quick, on_progress=save("end_to_end"), variants=args.e2e_variants,
                         batches=args.batches)
    save("layers")(report["layers"])
    print(f"wrote {args.out / f'kernels_{tag}.json'}")
    return report


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "triton", "bitsandbytes", "torchao", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


if __name__ == "__main__":
    main()
