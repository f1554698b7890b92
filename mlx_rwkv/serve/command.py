"""`mlx-rwkv serve`: the arguments and the entry point the CLI (`mlx_rwkv.cli`) wires in.

    from mlx_rwkv.serve import add_serve_arguments, run_serve
    p = sub.add_parser("serve", ...); add_serve_arguments(p); p.set_defaults(func=run_serve)

Every option is checked while argparse parses it (one-line errors). The server needs the
`serve` extra (starlette, uvicorn); without it `run_serve` raises ImportError naming it.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from .. import cli_args as check

API_KEY_ENV = "MLX_RWKV_API_KEY"
SYNTHETIC_ID = "rwkv7-synthetic-0.1B"


def port_number(text: str) -> int:
    """A TCP port: 0 (any free port) to 65535."""
    value = check.int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {value}")
    return value


def api_key(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("the key must be non-empty and contain no spaces")
    return text


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--dtype/--quant (as generate) and the server's own options."""
    from ..cli import add_model_args

    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 0.0.0.0 exposes the server to the network (use --api-key)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--max-batch", type=check.int_at_least(1), default=32,
                        help="sequences decoded together in one step at most (more wait for a slot)")
    parser.add_argument("--cache-mb", type=check.number_in(0, 2**20), default=2048.0,
                        help="memory for cached prefix states (LRU); 0 turns the prefix cache off")
    parser.add_argument("--state", type=check.existing_file,
                        help="initial state of every request: an RWKV-PEFT state-tuning .pth "
                             "(blocks.{i}.att.time_state) or a state saved by `chat` /save")
    parser.add_argument("--max-prompt-tokens", type=check.int_at_least(1), default=32768,
                        help="longest prompt accepted (400 above it)")
    parser.add_argument("--prefill-chunk", type=check.int_at_least(1), default=512,
                        help="prompt tokens prefilled between two decode steps (bounds the stall of running streams)")
    parser.add_argument("--api-key", type=api_key,
                        help=f"require 'Authorization: Bearer KEY' on every route but /health "
                             f"(also read from ${API_KEY_ENV})")
    parser.add_argument("--model-id", help="the model name clients send (default: the file name without "
                                           f"its suffix, {SYNTHETIC_ID} without --model)")
    parser.set_defaults(stop_token=None)  # load_model checks --stop-token, which serve does not have


def check_listen(host: str, port: int) -> None:
    """ValueError (one line) unless a server could listen on host:port now."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def run_serve(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple] | None = None) -> None:
    """Load the model, then serve until Ctrl-C (uvicorn stops gracefully, the engine fails what is left).

    load: `(args) -> (model, tokenizer)` in place of --model/--dtype/--quant (bench.bench_serve
    serves synthetic weights of a real shape this way)."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("the server needs starlette and uvicorn: pip install 'mlx-rwkv[serve]'") from None
    from ..cli import load_model
    from ..state_files import load_state_file
    from .app import make_app
    from .cache import PrefixCache
    from .engine import Engine

    check_listen(args.host, args.port)  # before the model loads: a taken port is one line, at once
    model, tokenizer = (load or load_model)(args)
    initial = load_state_file(args.state, model) if args.state else None
    model_id = args.model_id or (Path(args.model).stem if args.model else SYNTHETIC_ID)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, cache=PrefixCache(int(args.cache_mb * 2**20)),
                    initial_state=initial, prefill_chunk=args.prefill_chunk)
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = make_app(engine, tokenizer, model_id, api_key=key, max_prompt_tokens=args.max_prompt_tokens)
    print(f"serving {model_id!r} on http://{args.host}:{args.port}/v1 (batch <= {args.max_batch}, "
          f"cache {args.cache_mb:g} MB{', API key required' if key else ''})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
