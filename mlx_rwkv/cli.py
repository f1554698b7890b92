"""Command line: `mlx-rwkv generate | chat | serve | info | synth | quantize | doctor | bench`
(also `python -m mlx_rwkv`).

Every option is checked while it is parsed (`cli_args`); every command that writes a file
follows `output_files.check_output` (no replacing without --force, never the loaded model).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__
from . import cli_args as check
from .bench_cli import add_bench_arguments, run_bench
from .config import SHAPES, config_for_shape
from .serve import add_serve_arguments, run_serve

RANDOM_WEIGHTS_NOTE = ("note: no --model given: running the built-in synthetic 0.1B model. Its weights are "
                       "RANDOM, so the text is gibberish; it shows the engine's speed, not a language model.")
DTYPES = ["float16", "bfloat16", "float32"]
CONVERT_TYPES = ["q4_k", "q8_0", "f16", "f32"]


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its description (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default is not None and default is not False and default != [] and default is not argparse.SUPPRESS
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=check.existing_file,
                   help="checkpoint: .pth, .safetensors, rwkv.cpp .bin, rwkv7 .gguf, or a Q4_K file "
                        "(none: the built-in synthetic 0.1B model with random weights)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weight dtype; auto = float16 on a GPU, float32 on CPU (MLX's CPU float16 is slow)")
    p.add_argument("--quant", choices=["q4k"], help="quantize the linear layers to Q4_K at load (default: keep the file's storage)")


def add_state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=check.existing_file,
                   help="start from this state: one saved by chat /save, or an RWKV-PEFT state-tuning .pth "
                        "(blocks.{i}.att.time_state)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=check.int_at_least(0), default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=check.number_in(0, 100), default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=check.number_in(0, 1, low_open=True), default=0.7,
                   help="keep the smallest set of tokens whose probability reaches this (1 = off)")
    p.add_argument("--top-k", type=check.int_at_least(0), default=0, help="keep the k likeliest tokens (0 = off)")
    p.add_argument("--min-p", type=check.number_in(0, 1, high_open=True), default=0.0,
                   help="drop tokens below this fraction of the top token's probability (0 = off)")
    p.add_argument("--presence-penalty", type=check.finite_number, default=0.0,
                   help="subtracted from the logit of every token generated so far")
    p.add_argument("--frequency-penalty", type=check.finite_number, default=0.0,
                   help="subtracted per (decayed) occurrence of a generated token")
    p.add_argument("--penalty-decay", type=check.number_in(0, 1, low_open=True), default=0.996,
                   help="per-step decay of the occurrence counts (the official pipeline's)")
    p.add_argument("--stop", type=check.unescaped, action="append", default=[],
                   help=r"stop string, not printed (repeatable); \n, \t and \\ are unescaped, so --stop '\n\n' "
                        "stops at a blank line")
    p.add_argument("--stop-token", type=check.int_at_least(0), action="append",
                   help="stop token id (repeatable; default: the tokenizer's end of text, if it has one)")
    p.add_argument("--seed", type=check.seed, help="random seed in [0, 2**64) for reproducible sampling (default: a new random seed each run)")
    p.add_argument("--chunk-size", type=check.int_at_least(1), default=1024,
                   help="prefill chunk length in tokens (bounds memory)")
    p.add_argument("--on-nonfinite", choices=["raise", "stop"], default="raise",
                   help="what to do when the logits become NaN/inf")


def sampling_from(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          penalty_decay=args.penalty_decay)


def load_model(args: argparse.Namespace, engine: str = "mlx"):
    """(model, tokenizer) for --model/--dtype/--quant; also checks --stop-token against the vocab."""
    from .kernels import gpu_backend
    from .loading import load

    if args.dtype == "auto":
        args.dtype = "float16" if gpu_backend() or engine == "webgpu" else "float32"
    if args.model is None:
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    t0 = time.perf_counter()
    if engine == "webgpu":
        from .webgpu_engine import load_webgpu

        if args.dtype == "bfloat16":
            raise ValueError("the WebGPU engine stores matrices as float16 or float32, not bfloat16")
        model, tokenizer = load_webgpu(args.model, args.dtype, args.quant, args.chunk_size)
    else:
        model, tokenizer = load(args.model, dtype=args.dtype, quant=args.quant, progress=True)
    c = model.config
    if tokenizer is None:
        raise ValueError(f"no tokenizer for a vocabulary of {c.vocab_size} tokens (World = 65536, bytes = 256)")
    bad = [t for t in args.stop_token or [] if t >= c.vocab_size]
    if bad:
        raise ValueError(f"--stop-token {bad[0]} is outside this model's vocabulary (0..{c.vocab_size - 1})")
    print(f"loaded {c.n_layer} layers, C={c.n_embd}, vocab {c.vocab_size} ({engine}, {args.dtype}"
          f"{', q4k' if args.quant else ''}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tokenizer


def stream_to_stdout(model, tokenizer, prompt: str, args: argparse.Namespace, state=None):
    """Print the generation as it streams; returns the last chunk (with the final state)."""
    from .generate import stream_generate

    last = None
    for chunk in stream_generate(model, tokenizer, prompt, args.max_tokens, sampling_from(args), state=state,
                                 stop_tokens=args.stop_token, stop_strings=args.stop, seed=args.seed,
                                 on_nonfinite=args.on_nonfinite, chunk_size=args.chunk_size):
        print(chunk.text, end="", flush=True)
        last = chunk
    return last


def initial_state(args: argparse.Namespace, model):
    """The --state file (ours or an RWKV-PEFT state-tuning .pth) as a State, or None."""
    from .state_files import load_state_file

    return load_state_file(args.state, model) if args.state else None


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args, args.engine)
    if args.state and args.engine == "webgpu":
        raise ValueError("--state runs on the MLX engine only")
    last = stream_to_stdout(model, tokenizer, args.prompt, args, initial_state(args, model))
    print()
    print(f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, {last.generated_tokens} generated "
          f"at {last.generation_tps:.1f} tok/s, peak memory {last.peak_memory_mb:.0f} MB, "
          f"stopped: {last.finish_reason}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from .chat import ChatSession, prompts, turn_prompt

    model, tokenizer = load_model(args)
    args.stop = args.stop or ["\n\n"]
    session = ChatSession(model, initial_state(args, model), loaded=[args.model] if args.model else [])
    print("chat: /help lists the commands. The state carries the conversation (no re-prefill).", file=sys.stderr)
    for text in prompts(input, session):
        print("Assistant:", end="", flush=True)
        session.state = stream_to_stdout(model, tokenizer, turn_prompt(text), args, session.state).state
        print()


def cmd_info(args: argparse.Namespace) -> None:
    from .info import describe, format_info

    print(format_info(describe(args.path)))


def cmd_synth(args: argparse.Namespace) -> None:
    from .output_files import check_output
    from .synth import write_synthetic

    check_output(args.output, args.force)
    config = config_for_shape(args.shape, n_layer=args.layers, n_embd=args.embd, vocab_size=args.vocab)
    need = synthetic_bytes(config, args.dtype)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise ValueError(f"that model needs {need / 2**30:,.1f} GiB in memory to write, more than this machine's "
                         f"{memory / 2**30:,.1f} GiB")
    if config.vocab_size not in (256, 65536):
        print(f"note: no tokenizer has {config.vocab_size} tokens (World: 65536, bytes: 256), so generate and chat "
              "cannot run this model; the Python API takes token ids", file=sys.stderr)
    config = write_synthetic(args.output, shape=args.shape, seed=args.seed, dtype=args.dtype, n_layer=args.layers,
                             n_embd=args.embd, vocab_size=args.vocab, replace=args.force, progress=True)
    print(f"wrote {args.output}: random weights, {config}", file=sys.stderr)


def synthetic_bytes(config, dtype: str) -> int:
    """Bytes of the tensors `synth` would hold for `config` (every layer but the first is the same size)."""
    import dataclasses

    import numpy as np

    def params(n_layer: int) -> int:
        shapes = dataclasses.replace(config, n_layer=n_layer).expected_shapes().values()
        return sum(int(np.prod(shape)) for shape in shapes)

    one = params(1)
    per_layer = params(2) - one if config.n_layer > 1 else 0
    return (one + (config.n_layer - 1) * per_layer) * np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize


def cmd_quantize(args: argparse.Namespace) -> None:
    from .convert import convert
    from .output_files import check_output

    check_output(args.output, args.force, loaded=[args.input])
    t0 = time.perf_counter()
    out = convert(args.input, args.output, args.type, include_head=not args.keep_head, progress=True,
                  replace=args.force)
    print(f"wrote {out} ({args.type}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def cmd_doctor(args: argparse.Namespace) -> None:
    from .doctor import run_doctor
    from .output_files import check_output

    if args.report:
        check_output(args.report, args.force)
    raise SystemExit(run_doctor(args.report))


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="mlx-rwkv", description="RWKV-7 inference on MLX (Metal, CUDA, CPU)",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--version", action="version", version=f"mlx-rwkv {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    g = command("generate", "stream a completion of --prompt", cmd_generate)
    add_model_args(g)
    g.add_argument("--prompt", default="The quick brown fox", help="the text to continue")
    g.add_argument("--engine", choices=["mlx", "webgpu"], default="mlx",
                   help="mlx: this engine; webgpu: the WebGPU reference engine (needs a Vulkan/Metal adapter)")
    add_state_arg(g)
    add_sampling_args(g)

    c = command("chat", "interactive chat that keeps the state between turns (/help inside)", cmd_chat)
    add_model_args(c)
    add_state_arg(c)
    add_sampling_args(c)

    v = command("serve", "OpenAI-compatible HTTP server: prefix-state cache, continuous batching, state files",
                run_serve)
    add_serve_arguments(v)

    i = command("info", "describe a checkpoint (format, sizes, storage) without loading it onto the device",
                cmd_info)
    i.add_argument("path", type=check.existing_file, help="any checkpoint `generate --model` accepts")

    s = command("synth", "write a checkpoint of random weights at real shapes", cmd_synth)
    s.add_argument("--shape", default="0.1B", choices=list(SHAPES), help="the real model size to copy")
    s.add_argument("--layers", type=check.int_at_least(1), help="override the number of layers")
    s.add_argument("--embd", type=check.multiple_of(64), help="override the width C (heads of 64)")
    s.add_argument("--vocab", type=check.int_at_least(1), help="override the vocabulary size (65536 = World)")
    s.add_argument("--seed", type=check.seed, default=0, help="random seed of the weights")
    s.add_argument("--dtype", default="float16", choices=DTYPES, help="dtype of the stored tensors")
    s.add_argument("-o", "--output", required=True, type=check.output_file(".pth", ".safetensors"),
                   help="out.pth or out.safetensors")
    s.add_argument("--force", action="store_true", help="replace an existing output file")

    q = command("quantize", "convert a checkpoint: Q4_K (or Q8_0/F16/F32) GGUF, or our Q4_K safetensors",
                cmd_quantize)
    q.add_argument("input", type=check.existing_file, help="any checkpoint `generate --model` accepts")
    q.add_argument("output", type=check.output_file(".gguf", ".safetensors"),
                   help="OUT.gguf (llama.cpp's format) or OUT.safetensors (ours)")
    q.add_argument("--type", choices=CONVERT_TYPES, default="q4_k", help="storage of the linear layers")
    q.add_argument("--keep-head", action="store_true", help="leave the head unquantized")
    q.add_argument("--force", action="store_true", help="replace an existing output file (never the input)")

    d = command("doctor", "self-check: every kernel against the pure-MLX reference, SIMD lanes, a generation",
                cmd_doctor)
    d.add_argument("--report", type=check.output_file(".json"), help="also write the results as JSON here")
    d.add_argument("--force", action="store_true", help="replace an existing report")

    b = command("bench", "the sync experiment: decode/prefill tok/s per engine, precision and sync strategy",
                run_bench)
    add_bench_arguments(b)
    return ap


def main(argv: list[str] | None = None) -> None:
    from .chat import one_line
    from .generate import NonFiniteLogitsError
    from .layer_kernel import GridBarrierError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (NonFiniteLogitsError, GridBarrierError, ValueError, ImportError, OSError) as e:  # + CheckpointError, ...
        raise SystemExit(f"error: {one_line(e) if isinstance(e, OSError) else e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
