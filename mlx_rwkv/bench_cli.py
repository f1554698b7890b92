"""`mlx-rwkv bench`: the sync experiment and the throughput matrix as one command.

    mlx-rwkv bench                      # quick: 0.1B, f16 and Q4_K, every strategy, MLX + WebGPU
    mlx-rwkv bench --shapes 1.5B 7.2B --precisions q4k --strategies compiled --contexts 0 4k 16k 64k \
        --prefill-tokens 64k --write --plot

Prints a Markdown table of the records (DESIGN.md's format; progress goes to stderr). --write
merges them into <results-dir>/<device>-<date>.json after each model, so a run cut short keeps
what it measured; --plot draws the PNGs (mlx_rwkv.bench_plots) from that file (or from this
run's records without --write). The measurements are mlx_rwkv.benchmark's.
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

from . import cli_args as check
from typing import TYPE_CHECKING

from .bench_plots import plot_paths, plot_results
from .bench_records import (BANDWIDTH_BYTES, ENGINES, PRECISIONS, STRATEGIES, device_name, engine_of,
                            measure_bandwidth_gb_s, read_results, results_path, write_results)
from .config import SHAPES, config_for_shape

if TYPE_CHECKING:
    from .benchmark import Plan

GPU_BANDWIDTH_BYTES = 1 << 30  # on a GPU: a 1 GiB copy, far beyond any cache
COLUMNS = ("engine", "strategy", "shape", "precision", "mode", "context", "tokens", "tok/s", "spread",
           "kernels/token", "syncs/token", "peak MB", "roofline")


def token_count(text: str) -> int:
    """A token count >= 0; a k suffix multiplies by 1024 (64k = 65536)."""
    scale = 1024 if text.lower().endswith("k") else 1
    return check.int_at_least(0)(text[:-1] if scale > 1 else text) * scale


def positive_token_count(text: str) -> int:
    value = token_count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mlx-rwkv bench` (every value checked while parsing)."""
    p.add_argument("--shapes", nargs="+", default=["0.1B"], choices=list(SHAPES), metavar="SHAPE",
                   help=f"real model sizes to synthesize: {', '.join(SHAPES)}")
    p.add_argument("--precisions", nargs="+", default=["f16", "q4k"], choices=PRECISIONS, metavar="PREC",
                   help=f"matrix storage: {', '.join(PRECISIONS)} (WebGPU: f16, f32, q4k)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES, metavar="ENGINE",
                   help="mlx, webgpu (where a wgpu adapter exists) and hybrid (WebGPU + the MLX Q4_K mat-vec)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES, metavar="STRATEGY",
                   help=f"where the host waits (README, \"The sync experiment\"): {', '.join(STRATEGIES)}")
    p.add_argument("--layers", type=check.int_at_least(1), help="override the layer count (quick runs)")
    p.add_argument("--embd", type=check.multiple_of(64), help="override the width C (Q4_K needs a multiple of 256)")
    p.add_argument("--vocab", type=check.int_at_least(1), help="override the vocabulary size (65536)")
    p.add_argument("--decode-steps", type=check.int_at_least(1), default=8, help="timed decode tokens per repeat")
    p.add_argument("--slow-steps", type=check.int_at_least(1), default=4,
                   help="the same for strategies that wait many times a token "
                        "(per-layer, per-op, webgpu-per-op, hybrid)")
    p.add_argument("--repeats", type=check.int_at_least(1), default=3, help="timed repeats (the median is recorded)")
    p.add_argument("--contexts", nargs="+", type=token_count, default=[], metavar="N",
                   help="MLX: decode after prefilling N tokens each (e.g. 0 4k 16k 64k)")
    p.add_argument("--batches", nargs="+", type=check.int_at_least(1), default=[], metavar="B",
                   help="MLX: decode B sequences at once with the fastest strategy (aggregate tok/s), e.g. 8 32 64")
    p.add_argument("--prefill-tokens", nargs="+", type=positive_token_count, default=[], metavar="N",
                   help="MLX: time the prefill of N tokens from a zero state, with peak memory (e.g. 1k 64k)")
    p.add_argument("--chunk-size", type=check.int_at_least(1), default=1024, help="prefill chunk length in tokens")
    p.add_argument("--official", action="store_true",
                   help="also run the official rwkv package (torch; CUDA fp16 where there is one) on f16/f32 weights")
    p.add_argument("--write", action="store_true", help="merge the records into <results-dir>/<device>-<date>.json")
    p.add_argument("--plot", action="store_true", help="draw the PNG plots into <results-dir> (needs matplotlib)")
    p.add_argument("--results-dir", type=check.directory_path, default=Path("bench/results"),
                   help="where --write and --plot write (a directory)")
    p.add_argument("--force", action="store_true",
                   help="replace existing plots, and a file in the results' place that is not a results file")


def plan_from(args: argparse.Namespace) -> "Plan":
    """The Plan of parsed options; ValueError (one line) for combinations that cannot run."""
    from .benchmark import Plan  # MLX and wgpu load only when the command runs

    overrides = {k: v for k, v in (("n_layer", args.layers), ("n_embd", args.embd), ("vocab_size", args.vocab))
                 if v is not None}
    strategies = [s for s in args.strategies if engine_of(s) in args.engines]
    if not strategies and not (args.contexts or args.prefill_tokens or args.batches):
        raise ValueError("nothing to run: no --strategies of the chosen --engines")
    if (args.contexts or args.prefill_tokens or args.batches) and "mlx" not in args.engines:
        raise ValueError("--contexts, --prefill-tokens and --batches measure the MLX engine: add mlx to --engines")
    if "q4k" in args.precisions:
        for shape in args.shapes:
            c = config_for_shape(shape, **overrides)
            if c.n_embd % 256:
                raise ValueError(f"q4k needs C to be a multiple of 256; {shape} has C={c.n_embd}")
    official = args.official and all(importlib.util.find_spec(m) for m in ("torch", "rwkv"))
    if args.official and not official:  # a note, not an error: a GPU-host run keeps its other results
        print("note: --official skipped: it needs torch and the official rwkv package", file=sys.stderr)
    return Plan(shapes=args.shapes, precisions=args.precisions, strategies=strategies,
                decode_steps=args.decode_steps, slow_steps=args.slow_steps, repeats=args.repeats,
                contexts=args.contexts, batches=args.batches, prefill_tokens=args.prefill_tokens,
                chunk_size=args.chunk_size,
                official=official, overrides=overrides)


def command_line(args: argparse.Namespace) -> str:
    """The command as run, every option spelled out (what a results file records)."""
    parts = ["mlx-rwkv", "bench"]
    for name in ("shapes", "precisions", "engines", "strategies", "contexts", "batches", "prefill_tokens"):
        if getattr(args, name):
            parts += [f"--{name.replace('_', '-')}", *map(str, getattr(args, name))]
    for name in ("layers", "embd", "vocab", "decode_steps", "slow_steps", "repeats", "chunk_size"):
        if getattr(args, name) is not None:
            parts += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    parts += [f"--{name}" for name in ("official", "write", "plot", "force") if getattr(args, name)]
    return shlex.join(parts)


def format_table(records: list[dict]) -> str:
    """The records as a Markdown table (one row each)."""
    def cell(rec: dict, column: str) -> str:
        value = {"tok/s": rec.get("tok_s"), "spread": rec.get("tok_s_spread"),
                 "kernels/token": rec.get("kernels_per_token"), "syncs/token": rec.get("syncs_per_token"),
                 "peak MB": rec.get("peak_memory_mb"), "roofline": rec.get("roofline_fraction")}.get(column,
                                                                                                    rec.get(column))
        if value is None:
            return ""
        if column == "spread":
            return f"{value[0]:g}-{value[1]:g}"
        if column == "roofline":
            return f"{value:.1%}"
        return f"{value:g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in records]
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> None:
    """`mlx-rwkv bench`: measure, print the table, and write / plot when asked."""
    from .benchmark import run, webgpu_available
    from .kernels import gpu_backend

    plan = plan_from(args)
    if args.write or args.plot:
        args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.plot:
        _pyplot_or_error()
        plot_paths(args.results_dir, results_path(args.results_dir).stem, args.force)  # refuse before measuring
    plan.bandwidth_gb_s = measure_bandwidth_gb_s(GPU_BANDWIDTH_BYTES if gpu_backend() else BANDWIDTH_BYTES)
    print(f"device copy bandwidth: {plan.bandwidth_gb_s} GB/s ({gpu_backend() or 'cpu'})", file=sys.stderr)
    adapter = webgpu_available() if any(engine_of(s) != "mlx" for s in plan.strategies) else None
    if adapter:
        print(f"WebGPU adapter: {adapter}", file=sys.stderr)
    records, path = [], None
    for batch in run(plan, adapter=adapter):
        records += batch
        if args.write and batch:
            path = write_results(batch, command_line(args), results_dir=args.results_dir,
                                 bandwidth_gb_s=plan.bandwidth_gb_s, force=args.force)
    print(format_table(records))
    if path:
        print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        target = path or results_path(args.results_dir)
        doc = read_results(path) if path else {"device": device_name(), "date": target.stem[-10:],
                                               "bandwidth_gb_s": plan.bandwidth_gb_s, "records": records}
        for png in plot_results(doc, args.results_dir, target.stem, args.force):
            print(f"wrote {png}", file=sys.stderr)


def _pyplot_or_error() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("--plot needs matplotlib: pip install 'mlx-rwkv[bench]'")


def main(argv: list[str] | None = None) -> None:
    """`python -m mlx_rwkv.bench_cli ...`: the command without the rest of the CLI."""
    from .cli import HelpFormatter, Parser

    parser = Parser(prog="mlx-rwkv bench", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_bench(args)
    except (ValueError, ImportError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
