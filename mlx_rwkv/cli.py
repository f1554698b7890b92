"""Command line: `mlx-rwkv generate | chat | synth | quantize` (also `python -m mlx_rwkv`)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import SHAPES

RANDOM_WEIGHTS_NOTE = ("note: no --model given: running the built-in synthetic 0.1B model. Its weights are "
                       "RANDOM, so the text is gibberish; it shows the engine's speed, not a language model.")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint: .pth, .safetensors, rwkv.cpp .bin, rwkv7 .gguf, or a Q4_K file")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weight dtype; auto = float16 on a GPU, float32 on CPU (MLX's CPU float16 is slow)")
    p.add_argument("--quant", choices=["q4k"], help="quantize the linear layers to Q4_K at load")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--penalty-decay", type=float, default=0.996)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token", type=int, action="append", help="stop token id (repeatable; default: end of text)")
    p.add_argument("--seed", type=int)
    p.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk length (bounds memory)")
    p.add_argument("--on-nonfinite", choices=["raise", "stop"], default="raise",
                   help="what to do when the logits become NaN/inf")


def sampling_from(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          penalty_decay=args.penalty_decay)


def load_model(args: argparse.Namespace):
    from .kernels import gpu_backend
    from .loading import load

    if args.dtype == "auto":
        args.dtype = "float16" if gpu_backend() else "float32"
    if args.model is None:
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    t0 = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype, quant=args.quant, progress=True)
    if tokenizer is None:
        raise SystemExit(f"error: no tokenizer for a vocabulary of {model.config.vocab_size} tokens "
                         "(World = 65536, bytes = 256)")
    c = model.config
    print(f"loaded {c.n_layer} layers, C={c.n_embd}, vocab {c.vocab_size} ({args.dtype}"
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


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args)
    last = stream_to_stdout(model, tokenizer, args.prompt, args)
    print()
    print(f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, {last.generated_tokens} generated "
          f"at {last.generation_tps:.1f} tok/s, peak memory {last.peak_memory_mb:.0f} MB, "
          f"stopped: {last.finish_reason}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from .state import State, StateError

    model, tokenizer = load_model(args)
    args.stop = args.stop or ["\n\n"]
    state = State.load(args.state, model) if args.state else None
    print("chat: /save PATH, /load PATH, /reset, /quit. The state carries the conversation (no re-prefill).",
          file=sys.stderr)
    while True:
        try:
            line = input("User: ")
        except EOFError:
            break
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "/quit":
                break
            if cmd == "/reset":
                state = None
                continue
            if cmd == "/save":
                (state or model.new_state()).save(arg, model)
                print(f"[state saved to {arg}]", file=sys.stderr)
                continue
            if cmd == "/load":
                state = State.load(arg, model)
                print(f"[state loaded from {arg}]", file=sys.stderr)
                continue
        except (StateError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        print("Assistant:", end="", flush=True)
        last = stream_to_stdout(model, tokenizer, f"User: {line}\n\nAssistant:", args, state)
        state = last.state
        print()


def cmd_synth(args: argparse.Namespace) -> None:
    from .synth import write_synthetic

    config = write_synthetic(args.output, shape=args.shape, seed=args.seed, dtype=args.dtype,
                             n_layer=args.layers, n_embd=args.embd, vocab_size=args.vocab)
    print(f"wrote {args.output}: random weights, {config}", file=sys.stderr)


def cmd_quantize(args: argparse.Namespace) -> None:
    from .quant import quantize_file

    t0 = time.perf_counter()
    out = quantize_file(args.input, args.output, include_head=not args.keep_head)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlx-rwkv", description="RWKV-7 inference on MLX")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion of --prompt")
    add_model_args(g)
    g.add_argument("--prompt", default="The quick brown fox")
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat that keeps the state between turns")
    add_model_args(c)
    c.add_argument("--state", help="start from a state saved with /save")
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser("synth", help="write a checkpoint of random weights at real shapes")
    s.add_argument("--shape", default="0.1B", choices=list(SHAPES))
    s.add_argument("--layers", type=int)
    s.add_argument("--embd", type=int)
    s.add_argument("--vocab", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    s.add_argument("-o", "--output", required=True, type=Path, help="out.pth or out.safetensors")
    s.set_defaults(func=cmd_synth)
    q = sub.add_parser("quantize", help="write a Q4_K copy of a checkpoint (reloads fast)")
    q.add_argument("input", type=Path)
    q.add_argument("output", type=Path)
    q.add_argument("--keep-head", action="store_true", help="leave the head in the weight dtype")
    q.set_defaults(func=cmd_quantize)
    return ap


def main(argv: list[str] | None = None) -> None:
    from .config import CheckpointError
    from .generate import NonFiniteLogitsError
    from .state import StateError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, StateError, NonFiniteLogitsError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
