"""The ``jax-nf4`` command line: ``quantize``, ``inspect``, ``generate`` and ``bench``
(the kernel table of :mod:`jax_nf4.benchmark`, or with ``--model`` NF4-vs-bf16 decoding).

Exit codes: 0 on success, 1 on a runtime error (a bad or unsupported checkpoint, an existing
destination, an I/O error), 2 on a usage error; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["main"]

_PROG = "jax-nf4"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.strerror and not isinstance(e, FileExistsError):
        text = f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror
    return " ".join(text.split())


#: The presets of jax_nf4.models.llama.CONFIGS (listed here so that --help imports no flax).
_MODEL_CONFIGS = ("tiny", "llama3-8b", "llama3-70b")


def _add_decode_options(p: argparse.ArgumentParser, *, new_tokens: int, prompt_len: int
                        ) -> None:
    """The decoding options of ``generate`` and ``bench --model``."""
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences (default 1)")
    p.add_argument("--new-tokens", type=int, default=new_tokens, metavar="N",
                   help=f"tokens to generate per sequence (default {new_tokens})")
    p.add_argument("--prompt-len", type=int, default=prompt_len, metavar="P",
                   help=f"random prompt tokens per sequence (default {prompt_len})")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="activation and dense weight dtype (default bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    p.add_argument("--iters", type=int, default=3, metavar="N",
                   help="timed runs after the compiling one; the best is reported (default 3)")


def _bench_model_parser() -> _Parser:
    """The options of ``jax-nf4 bench --model`` (without ``--model``, ``bench`` is
    :func:`jax_nf4.benchmark.main`, which parses its own)."""
    b = _Parser(
        prog=f"{_PROG} bench", add_help=False,
        description="With --model: build a Llama-style decoder (jax_nf4.models.llama, random "
        "weights) with NF4 projections, then with dense ones, decode greedily from the same "
        "random prompt and print tokens/s, weight memory and the device's peak memory of each "
        "(a progress bar on stderr). The llama3-* presets are meant for a GPU.")
    b.add_argument("--model", dest="config", required=True, choices=_MODEL_CONFIGS,
                   metavar="CONFIG", help=f"model preset: {', '.join(_MODEL_CONFIGS)}")
    _add_decode_options(b, new_tokens=64, prompt_len=16)
    return b


def _build_parser() -> _Parser:
    from jax_nf4.bnb import BLOCKSIZES
    from jax_nf4.convert import DEFAULT_SKIP

    top = _Parser(prog=_PROG, description="NF4 (4-bit NormalFloat) weights for JAX.",
                  epilog="Run `jax-nf4 COMMAND --help` for the options of a command.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    q = sub.add_parser(
        "quantize", help="quantize a dense safetensors checkpoint to bitsandbytes NF4",
        description="Quantize a dense safetensors file or Hugging Face model folder (bf16, f16 "
        "or f32 weights) to an NF4 checkpoint in the bitsandbytes / Hugging Face layout, which "
        "transformers (with bitsandbytes) and jax_nf4.checkpoint.load_checkpoint load. Works "
        "tensor by tensor (memory bounded by the largest tensor). 2-D *.weight matrices are "
        "quantized; embeddings, norms, lm_head, 1-D tensors and biases stay dense (so do "
        "matrices with an odd N or a K that is not a multiple of the block size, listed in "
        "llm_int8_skip_modules). A folder gives a folder "
        "(same shards, config.json with quantization_config, the other files copied); a file "
        "gives a file when DST ends in .safetensors. DST appears only when complete.",
        epilog=f"Default skip patterns: {' '.join(DEFAULT_SKIP)}")
    q.add_argument("src", metavar="SRC", help="dense .safetensors file or model folder")
    q.add_argument("dst", metavar="DST", help="destination folder (or .safetensors file)")
    q.add_argument("--block-size", type=int, default=64, choices=BLOCKSIZES, metavar="N",
                   help="elements sharing one scale: 32, 64 (default), 128, ... 4096")
    q.add_argument("--double-quant", action="store_true",
                   help="also quantize the scales to 8 bits (bnb_4bit_use_double_quant)")
    q.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="regular expression (searched in tensor names) of more weights to keep "
                        "dense; repeat the option for several")
    q.add_argument("--no-default-skip", action="store_true",
                   help="quantize embeddings, norms and lm_head too when they are 2-D")
    q.add_argument("--force", action="store_true", help="replace DST if it exists")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    i = sub.add_parser("inspect", help="show the tensors and formats of a checkpoint",
                       description="List what a safetensors file or model folder holds: "
                       "NF4 layers (plain or double-quantized, block size, bits per weight) and "
                       "dense tensors, with sizes and totals. Reads headers and quant states "
                       "only.")
    i.add_argument("path", metavar="PATH", help=".safetensors file or model folder")
    i.add_argument("--json", action="store_true", help="print the rows as JSON")

    g = sub.add_parser(
        "generate", help="greedy decoding with a Llama-style model (random or checkpoint weights)",
        description="Build a Llama-style decoder (jax_nf4.models.llama) with random weights "
        "(or those of --checkpoint), NF4 projections (or dense ones with --dense; NF4 "
        "checkpoint weights are then dequantized), and decode greedily from a random "
        "prompt with a static KV cache, in one jitted program. Prints the generated token ids "
        "and tokens/s (prefill included, compile excluded). --bench prints the NF4-vs-dense "
        "table of `jax-nf4 bench --model` instead. The llama3-* presets are meant for a GPU.")
    g.add_argument("--config", default="tiny", choices=_MODEL_CONFIGS,
                   help="model preset (default tiny)")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a Hugging Face Llama folder (dense or bitsandbytes NF4) to take the "
                        "weights and shapes from instead of --config's random ones")
    _add_decode_options(g, new_tokens=16, prompt_len=8)
    g.add_argument("--dense", action="store_true",
                   help="dense projections (nnx.Linear in --dtype) instead of NF4")
    g.add_argument("--bench", action="store_true",
                   help="time NF4 and dense weights and print a table (tokens/s, memory)")

    sub.add_parser(
        "bench", add_help=False, parents=[_bench_model_parser()],
        help="time the NF4 ops against dense bf16 and plain-jnp NF4; with --model, decode "
             "tokens/s of a Llama-style model, NF4 vs bf16 (run `jax-nf4 bench --help`)")
    return top


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_ST_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _inspect_rows(path: str) -> tuple[dict, list[dict]]:
    from jax_nf4 import bnb
    from jax_nf4.checkpoint import Checkpoint

    ck = Checkpoint(path)
    rows = []
    for e in ck.entries():
        nbytes = sum(ck.info(k).nbytes for k in e.keys)
        if e.kind == "dense":
            info = ck.info(e.name)
            rows.append({"name": e.name, "format": "dense", "shape": list(info.shape),
                         "dtype": info.dtype_name, "block_size": None,
                         "bits_per_weight": 8.0 * info.dtype.itemsize, "bytes": nbytes,
                         "params": info.size})
            continue
        if e.kind == "fp4":
            rows.append({"name": e.name, "format": "fp4 (unsupported)", "shape": None,
                         "dtype": None, "block_size": None, "bits_per_weight": None,
                         "bytes": nbytes, "params": None})
            continue
        qs_key = f"{e.name}.{bnb.QUANT_STATE_SUFFIX}"
        state = bnb.parse_quant_state(ck[qs_key], source=ck.source_of(qs_key), key=qs_key)
        params = math.prod(state["shape"])
        storage = ck.info(e.name).dtype_name if e.name in ck else "?"
        rows.append({"name": e.name,
                     "format": "nf4+dq" if "nested_offset" in state else "nf4",
                     "shape": state["shape"], "dtype": _ST_NAMES[state["dtype"]],
                     "storage": storage, "block_size": state["blocksize"],
                     "bits_per_weight": 8.0 * nbytes / params if params else 0.0,
                     "bytes": nbytes, "params": params})
    summary = {"path": str(ck.path), "files": len(ck.files), "tensors": len(ck),
               "quantization_config": ck.quantization_config}
    return summary, rows


def _inspect(args) -> int:
    summary, rows = _inspect_rows(args.path)
    if args.json:
        print(json.dumps({**summary, "entries": rows}, indent=1))
        return 0
    qc = summary["quantization_config"]
    head = f"{summary['path']}: {summary['tensors']} tensors in {summary['files']} file(s)"
    if qc:
        head += (f"; quantization_config: bitsandbytes {qc.get('bnb_4bit_quant_type')}, "
                 f"double_quant={qc.get('bnb_4bit_use_double_quant')}, compute dtype "
                 f"{qc.get('bnb_4bit_compute_dtype')}")
    print(head)
    width = max([len(r["name"]) for r in rows] + [4])
    print(f"{'name':<{width}}  {'format':<7} {'shape':<14} {'dtype':<9} {'block':>5} "
          f"{'bits/w':>6} {'size':>10}")
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] is not None else "?"
        block = str(r["block_size"]) if r["block_size"] else "-"
        bits = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] is not None else "?"
        print(f"{r['name']:<{width}}  {r['format']:<7} {shape:<14} {r['dtype'] or '?':<9} "
              f"{block:>5} {bits:>6} {_fmt_bytes(r['bytes']):>10}")
    nf4 = [r for r in rows if r["format"].startswith("nf4")]
    dense = [r for r in rows if r["format"] == "dense"]
    q_params = sum(r["params"] for r in nf4)
    q_bytes = sum(r["bytes"] for r in nf4)
    total = sum(r["bytes"] for r in rows)
    line = (f"total: {len(nf4)} NF4 layers ({q_params} weights, {_fmt_bytes(q_bytes)}"
            + (f", {8.0 * q_bytes / q_params:.3f} bits/weight" if q_params else "")
            + f"), {len(dense)} dense tensors ({sum(r['params'] for r in dense)} values, "
            f"{_fmt_bytes(sum(r['bytes'] for r in dense))}), {_fmt_bytes(total)} in all")
    fp4 = len(rows) - len(nf4) - len(dense)
    if fp4:
        line += f"; {fp4} FP4 layers (not supported by jax_nf4)"
    print(line)
    return 0


def _quantize(args) -> int:
    from jax_nf4.convert import quantize_checkpoint

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"{_PROG} quantize: {line}", file=sys.stderr, flush=True)

    report = quantize_checkpoint(args.src, args.dst, block_size=args.block_size,
                                 double_quant=args.double_quant, skip=args.skip,
                                 default_skip=not args.no_default_skip, force=args.force,
                                 progress=progress)
    progress(f"done: {len(report.quantized)} weights quantized, {len(report.dense)} tensors "
             f"copied; {_fmt_bytes(report.bytes_in)} -> {_fmt_bytes(report.bytes_out)} "
             f"in {args.dst}")
    return 0


class _ProgressBar:
    """``progress(done, total, stage)`` of ``benchmark_decode`` drawn on stderr: one redrawn
    line on a terminal, a line per stage otherwise."""

    def __init__(self, label: str, width: int = 20):
        self.label = label
        self.width = width
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, stage: str) -> None:
        filled = self.width * done // total
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {stage}"
        if self.tty:  # redraw in place, clearing the rest of the line
            line = f"\r{line}\x1b[K" + ("\n" if done == total else "")
        else:
            line += "\n"
        sys.stderr.write(line)
        sys.stderr.flush()


def _decode_setup(args) -> tuple[ModuleType, dict]:
    """The llama module and ``benchmark_decode`` keywords of ``generate`` / ``bench --model``."""
    import jax.numpy as jnp

    try:
        from jax_nf4.models import llama
    except ImportError as e:
        raise ValueError(f"{args.command} needs flax (pip install flax): {e}") from None
    for name in ("batch", "new_tokens", "prompt_len", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    kw = {"prompt_len": args.prompt_len, "dtype": jnp.dtype(args.dtype), "iters": args.iters,
          "seed": args.seed, "checkpoint": getattr(args, "checkpoint", None)}
    return llama, kw


def _model_name(args) -> str:
    checkpoint = getattr(args, "checkpoint", None)
    return args.config if checkpoint is None else Path(checkpoint).name


def _compare_decode(args) -> int:
    """``bench --model`` and ``generate --bench``: NF4 vs dense decoding, tokens/s and memory."""
    llama, kw = _decode_setup(args)
    name = _model_name(args)
    rows = llama.compare_decode(args.config, args.batch, args.new_tokens,
                                progress=_ProgressBar(name), **kw)
    print(f"{name}: {rows[0]['n_layers']} layers, d_model {rows[0]['d_model']}, batch "
          f"{args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'weights':<9} {'tokens/s':>10} {'ms/token':>9} {'compile s':>9} "
          f"{'weights':>10} {'projections':>11} {'peak mem':>10}")
    for r in rows:
        ms = 1e3 * r["seconds"] / r["new_tokens"]
        peak = "-" if r["peak_bytes"] is None else _fmt_bytes(r["peak_bytes"])
        print(f"{r['weights']:<9} {r['tokens_per_s']:>10.1f} {ms:>9.2f} "
              f"{r['compile_s']:>9.1f} {_fmt_bytes(r['weight_bytes']):>10} "
              f"{_fmt_bytes(r['linear_bytes']):>11} {peak:>10}")
    nf4, dense = rows
    print(f"nf4 / {dense['weights']}: {nf4['tokens_per_s'] / dense['tokens_per_s']:.2f}x "
          f"tokens/s, {nf4['weight_bytes'] / dense['weight_bytes']:.2f}x weight memory")
    return 0


def _generate(args) -> int:
    if args.bench:
        return _compare_decode(args)
    llama, kw = _decode_setup(args)
    r = llama.benchmark_decode(args.config, args.batch, args.new_tokens, not args.dense, **kw)
    for row in r["tokens"].tolist():
        print(" ".join(map(str, row)))
    print(f"{_model_name(args)} ({r['weights']} weights, {_fmt_bytes(r['weight_bytes'])}): "
          f"{args.batch} x {args.new_tokens} tokens in {r['seconds'] * 1e3:.1f} ms, "
          f"{r['tokens_per_s']:.1f} tokens/s (compile {r['compile_s']:.1f} s)")
    return 0


def _kernel_bench(argv: list[str]) -> int:
    """``jax-nf4 bench`` without ``--model``: :func:`jax_nf4.benchmark.main`; its ``--help``
    is followed by the ``--model`` options."""
    from jax_nf4 import benchmark
    try:
        code = benchmark.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if code == 0 and ("-h" in argv or "--help" in argv):
        print(f"\n{_bench_model_parser().format_help()}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jax-nf4`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and ("-h" in argv or "--help" in argv or not any(
            a == "--model" or a.startswith("--model=") for a in argv)):
        return _kernel_bench(argv[1:])
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    from jax_nf4.safetensors_io import CheckpointError

    try:
        run = {"quantize": _quantize, "inspect": _inspect, "generate": _generate,
               "bench": _compare_decode}
        return run[args.command](args)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        print(f"{_PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
