"""Serving benchmark (issue 16): `mlx-rwkv serve` under concurrent streams, and a cached chat turn.

    python3 -m bench.bench_serve --shape 1.5B --precisions f16 q4k --write --plot

The real server (mlx_rwkv.serve: uvicorn, Starlette, the batching engine, the prefix cache)
runs in child processes (`python3 -c`, from the repository root) on free loopback ports, serving synthetic weights of a real shape
(mlx_rwkv.benchmark's, built in seconds). The clients run here, on asyncio streams with a
minimal HTTP/1.1 reader (`stream`): no HTTP client package, and the clients' own cost, in
another process than the server's, stays small beside it at 64 streams.

Decode: N streams at once, each a completion of --prompt-tokens random token ids and exactly
--max-tokens tokens (`ignore_eos`; temperature 1, seeded: the API's default sampling). The
aggregate rate is the tokens after each stream's first / the decode phase (the first stream's
first token to the last stream's last); time to first token (TTFT) is from sending a request
to its first streamed text, median and p90 over every stream of the --repeats rounds. One
untimed round first runs every padded batch size once (each compiles its step on a GPU).

Cached follow-up: a chat whose first user turn is --context words (one token each), answered
(max 16 tokens), then the follow-up [that turn, the answer, a new question] on the same server
(the prefix is cached) and, the same request, on a second server started with --cache-mb 0.
One untimed conversation first; --follow-ups timed ones (medians).

Records (DESIGN.md's format, engine "mlx", mode "serve", weights "synthetic"): strategy
"decode" (batch = streams, tokens = max tokens, tok_s aggregate, ttft_ms_median / _p90,
stream_tokens [min, max] per stream), "follow-up-cached" and "follow-up-uncached" (tokens = the
follow-up's prompt tokens, context = its tokens the cache held, ttft_ms). --write merges them
into <results-dir>/<device>-<date>.json after each precision; --plot draws
<device>-<date>-serve.png. A Markdown table goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Iterator

import numpy as np

from bench.results_io import RESULTS_DIR
from mlx_rwkv import cli_args as check
from mlx_rwkv.bench_plots import _pyplot, _source
from mlx_rwkv.bench_records import PRECISIONS, device_name, read_results, record, results_path, write_results
from mlx_rwkv.checkpoint.files import atomic_output
from mlx_rwkv.config import SHAPES, ModelConfig, config_for_shape
from mlx_rwkv.output_files import OutputError, check_output

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MODEL_ID = "synthetic"
START_TIMEOUT_S = 300  # model build and server start (the first kernel compilations come later)
ROUND_TIMEOUT_S = 300  # one round of requests
# single tokens (with their leading space) in the World vocabulary, and no two merge: n words = n tokens
WORDS = ("river stone light water house green music paper window garden table winter summer morning letter "
         "market silver forest island mountain yellow doctor engine bridge").split()
QUESTION = "And what comes next?"


# ---- the server ----------------------------------------------------------------------------

def serve_synthetic(config_json: str, precision: str, *serve_argv: str) -> None:
    """The child process (CHILD): `mlx-rwkv serve <serve_argv>` of synthetic weights."""
    from mlx_rwkv.benchmark import synthetic_model
    from mlx_rwkv.loading import tokenizer_for
    from mlx_rwkv.serve import add_serve_arguments, run_serve

    config = ModelConfig(**json.loads(config_json))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    load = lambda _: (synthetic_model(config, precision), tokenizer_for(config))  # noqa: E731
    run_serve(parser.parse_args(serve_argv), load)


CHILD = "import sys; from bench.bench_serve import serve_synthetic; serve_synthetic(*sys.argv[1:])"


class Server:
    """`serve_synthetic` in a child process on a free loopback port, its output in `log`; stopped
    with SIGTERM (uvicorn's graceful shutdown, as Ctrl-C)."""

    def __init__(self, config: ModelConfig, precision: str, cache_mb: float, max_batch: int, log: Path):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.log = log
        self.argv = [sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(config)), precision,
                     "--host", HOST, "--port", str(self.port), "--cache-mb", f"{cache_mb:g}",
                     "--max-batch", str(max_batch), "--model-id", MODEL_ID]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        """Until /health answers; RuntimeError with the log's tail if the child ended or took too long."""
        deadline = time.perf_counter() + START_TIMEOUT_S
        while self.proc.poll() is None and time.perf_counter() < deadline:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the server on port {self.port} did not start; its log ends:\n"
                           f"{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def servers(config: ModelConfig, precision: str, max_batch: int, log_dir: Path) -> Iterator[tuple[Server, Server]]:
    """Two servers started side by side: the prefix cache on (2 GB) and off (--cache-mb 0)."""
    pair = (Server(config, precision, 2048, max_batch, log_dir / f"{precision}-cache.log"),
            Server(config, precision, 0, max_batch, log_dir / f"{precision}-no-cache.log"))
    try:
        for s in pair:
            s.start()
        for s in pair:
            s.wait_ready()
        yield pair
    finally:
        for s in pair:
            s.stop()


# ---- the clients ---------------------------------------------------------------------------

@dataclass
class Reply:
    """One streamed request: when it was sent, its events (arrival time, `data:` payload)."""

    sent: float
    events: list[tuple[float, bytes]]
    skip: int  # leading events that carry no generated text (the chat role chunk)

    @property
    def first(self) -> float:
        return self.events[self.skip][0]

    @property
    def last(self) -> float:
        return self.events[-2][0]  # the usage chunk, before [DONE]

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def usage(self) -> dict:
        return json.loads(self.events[-2][1])["usage"]

    def text(self) -> str:
        chunks = [json.loads(data)["choices"] for _, data in self.events[:-2]]
        return "".join(c[0].get("delta", {}).get("content") or c[0].get("text", "") for c in chunks if c)


async def stream(port: int, path: str, body: dict, skip: int = 0) -> Reply:
    """POST `body` as a streamed request (usage included) and read its server-sent events: one
    HTTP/1.1 connection, a chunked response."""
    reader, writer = await asyncio.open_connection(HOST, port)
    data = json.dumps({"model": MODEL_ID, **body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    try:
        sent = time.perf_counter()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{path}: {head.splitlines()[0].decode()}: {(await reader.read()).decode()[:300]}")
        events, pending = [], b""
        while size := int(await reader.readline(), 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            *complete, pending = pending.split(b"\n\n")
            now = time.perf_counter()
            events += [(now, e.removeprefix(b"data: ")) for e in complete]
    finally:
        writer.close()
    if len(events) < 2 + skip or events[-1][1] != b"[DONE]" or b'"usage"' not in events[-2][1]:
        raise RuntimeError(f"{path}: the stream ended with {events[-2:]}")
    return Reply(sent, events, skip)


async def concurrent(port: int, n: int, prompt_tokens: int, max_tokens: list[int], seed: int) -> list[Reply]:
    """n completions at once: random prompts of `prompt_tokens` ids (drawn from `seed`), stream i
    `max_tokens[i]` tokens."""
    rng = np.random.default_rng(seed)
    bodies = [{"prompt": rng.integers(1, 65000, prompt_tokens).tolist(), "max_tokens": max_tokens[i],
               "temperature": 1.0, "seed": int(rng.integers(2**32)), "ignore_eos": True} for i in range(n)]
    return await asyncio.wait_for(asyncio.gather(*(stream(port, "/v1/completions", b) for b in bodies)),
                                  ROUND_TIMEOUT_S)


async def follow_up(cached: Server, uncached: Server, context: int, seed: int) -> tuple[Reply, Reply]:
    """A chat turn of `context` words answered by `cached`, then its follow-up on both servers."""
    words = " ".join(np.random.default_rng(seed).choice(WORDS, context))
    chat = "/v1/chat/completions"
    first = [{"role": "user", "content": words}]
    answer = await stream(cached.port, chat, {"messages": first, "max_tokens": 16, "seed": seed}, skip=1)
    body = {"messages": [*first, {"role": "assistant", "content": answer.text()}, {"role": "user", "content": QUESTION}],
            "max_tokens": 4, "seed": seed}
    return await stream(cached.port, chat, body, skip=1), await stream(uncached.port, chat, body, skip=1)


# ---- measurements --------------------------------------------------------------------------

async def measure(args: argparse.Namespace, precision: str, label: str, pair: tuple[Server, Server]) -> list[dict]:
    """The decode records of every --streams count and the two follow-up records."""
    cached, uncached = pair
    top = max(args.streams)
    log(f"{label} {precision}: warm-up")
    await asyncio.gather(concurrent(cached.port, top, args.prompt_tokens, [2 + i for i in range(top)], 0),
                         follow_up(cached, uncached, args.context, 0))
    records = []
    for n in args.streams:
        rates, ttfts, counts = [], [], []
        for r in range(args.repeats):
            seed = 1000 * n + r + 1  # prompts never seen before: the cache must not skip their prefill
            replies = await concurrent(cached.port, n, args.prompt_tokens, [args.max_tokens] * n, seed)
            tokens = sum(x.usage["completion_tokens"] - 1 for x in replies)
            rates.append(tokens / (max(x.last for x in replies) - min(x.first for x in replies)))
            ttfts += [x.ttft * 1e3 for x in replies]
            counts += [x.usage["completion_tokens"] for x in replies]
        records.append(record("mlx", label, precision, "serve", "decode", batch=n, tokens=args.max_tokens, rates=rates,
                              streams=n, prompt_tokens=args.prompt_tokens, stream_tokens=[min(counts), max(counts)],
                              ttft_ms_median=round(float(np.percentile(ttfts, 50)), 2),
                              ttft_ms_p90=round(float(np.percentile(ttfts, 90)), 2), weights="synthetic"))
        log(f"{label} {precision}: {n} streams: {records[-1]['tok_s']:.1f} tok/s, TTFT median "
            f"{records[-1]['ttft_ms_median']:.1f} ms")
    turns = [await follow_up(cached, uncached, args.context, 1 + k) for k in range(args.follow_ups)]
    for strategy, replies in (("follow-up-cached", [a for a, _ in turns]), ("follow-up-uncached", [b for _, b in turns])):
        usage = replies[-1].usage
        records.append(record("mlx", label, precision, "serve", strategy, tokens=usage["prompt_tokens"],
                              rates=[x.ttft * 1e3 for x in replies], rate_key="ttft_ms",
                              context=usage["prompt_tokens_details"]["cached_tokens"], weights="synthetic"))
    log(f"{label} {precision}: follow-up TTFT {records[-2]['ttft_ms']:.1f} ms cached, "
        f"{records[-1]['ttft_ms']:.1f} ms uncached")
    return records


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- output ----------------------------------------------------------------------------------

def decode_rows(records: list[dict]) -> list[dict]:
    return sorted((r for r in records if r.get("mode") == "serve" and r["strategy"] == "decode"),
                  key=lambda r: (r["shape"], r["precision"], r["batch"]))


def single_stream(records: list[dict], rec: dict) -> dict | None:
    """The 1-stream decode record of `rec`'s model."""
    return next((r for r in decode_rows(records) if r["batch"] == 1
                 and (r["shape"], r["precision"]) == (rec["shape"], rec["precision"])), None)


def format_tables(records: list[dict]) -> str:
    """Markdown: decode per stream count (x the 1-stream rate), then the follow-up TTFTs."""
    lines = ["| shape | precision | streams | aggregate tok/s | spread | x 1 stream | TTFT median ms | TTFT p90 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in decode_rows(records):
        one = single_stream(records, r)
        ratio = f"{r['tok_s'] / one['tok_s']:.2f}" if one else ""
        lines.append(f"| {r['shape']} | {r['precision']} | {r['batch']} | {r['tok_s']:.1f} | "
                     f"{r['tok_s_spread'][0]:g}-{r['tok_s_spread'][1]:g} | {ratio} | {r['ttft_ms_median']:g} | "
                     f"{r['ttft_ms_p90']:g} |")
    lines += ["", "| shape | precision | follow-up prompt tokens | cached | TTFT cached ms | TTFT uncached ms | ratio |",
              "|---|---|---|---|---|---|---|"]
    for c in (r for r in records if r.get("strategy") == "follow-up-cached"):
        u = next(r for r in records if r.get("strategy") == "follow-up-uncached"
                 and (r["shape"], r["precision"]) == (c["shape"], c["precision"]))
        lines.append(f"| {c['shape']} | {c['precision']} | {c['tokens']} | {c['context']} | {c['ttft_ms']:g} | "
                     f"{u['ttft_ms']:g} | 1/{u['ttft_ms'] / c['ttft_ms']:.1f} |")
    return "\n".join(lines)


def plot(doc: dict, path: Path, force: bool) -> None:
    """Aggregate tok/s against concurrent streams per model, beside 1 stream's rate x streams."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = sorted({(r["shape"], r["precision"]) for r in decode_rows(doc["records"])})
    for i, model in enumerate(models):
        rows = [r for r in decode_rows(doc["records"]) if (r["shape"], r["precision"]) == model]
        x = [r["batch"] for r in rows]
        ax.plot(x, [r["tok_s"] for r in rows], "o-", color=f"C{i}", label=" ".join(model))
        one = single_stream(doc["records"], rows[0])
        if one:
            ax.plot(x, [one["tok_s"] * n for n in x], "--", color=f"C{i}", alpha=0.5, label=f"{' '.join(model)}: 1 stream x N")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode tok/s (through the server)")
    ax.legend(fontsize=7)
    ax.set_title(f"mlx-rwkv serve: continuous batching (synthetic weights)\n{_source(doc)}", fontsize=9)
    fig.tight_layout()
    with atomic_output(path, replace=force) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# ---- the command -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, each checked while parsing (one-line error, exit 2)."""
    from mlx_rwkv.cli import HelpFormatter, Parser

    p = Parser(prog="python3 -m bench.bench_serve", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--shape", default="1.5B", choices=list(SHAPES), help="real model size to synthesize")
    p.add_argument("--layers", type=check.int_at_least(1), help="override the layer count (quick runs)")
    p.add_argument("--embd", type=check.multiple_of(64), help="override the width C (q4k needs a multiple of 256)")
    p.add_argument("--precisions", nargs="+", default=["f16", "q4k"], choices=PRECISIONS, metavar="PREC",
                   help=f"matrix storage: {', '.join(PRECISIONS)} (CPU: f32)")
    p.add_argument("--streams", nargs="+", type=check.int_at_least(1), default=[1, 8, 32, 64], metavar="N",
                   help="concurrent streams of each decode measurement (the server's --max-batch is the largest)")
    p.add_argument("--prompt-tokens", type=check.int_at_least(1), default=64, help="prompt length of each stream")
    p.add_argument("--max-tokens", type=check.int_at_least(2), default=128, help="tokens each stream generates")
    p.add_argument("--repeats", type=check.int_at_least(1), default=3, help="timed rounds per stream count")
    p.add_argument("--context", type=check.int_at_least(1), default=2000,
                   help="words (one token each) of the cached chat's first turn")
    p.add_argument("--follow-ups", type=check.int_at_least(1), default=3, help="timed cached/uncached follow-ups")
    p.add_argument("--write", action="store_true", help="merge the records into <results-dir>/<device>-<date>.json")
    p.add_argument("--plot", action="store_true", help="draw <results-dir>/<device>-<date>-serve.png (matplotlib)")
    p.add_argument("--results-dir", type=check.directory_path, default=RESULTS_DIR, help="where --write and --plot write")
    p.add_argument("--force", action="store_true", help="replace an existing plot")
    args = p.parse_args(argv)
    args.streams = sorted(set(args.streams))
    args.config = config_for_shape(args.shape, n_layer=args.layers, n_embd=args.embd)
    if "q4k" in args.precisions and args.config.n_embd % 256:
        p.error(f"q4k needs C to be a multiple of 256; this model has C={args.config.n_embd}")
    if args.plot:
        try:
            _pyplot()
            args.results_dir.mkdir(parents=True, exist_ok=True)
            results = results_path(args.results_dir)
            args.png = check_output(results.with_name(f"{results.stem}-serve.png"), args.force)
        except (ImportError, OutputError) as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> None:
    from mlx_rwkv.benchmark import Plan

    args = parse_args(argv)
    command = shlex.join(["python3", "-m", "bench.bench_serve", *(sys.argv[1:] if argv is None else argv)])
    label = Plan(overrides={k: v for k, v in (("n_layer", args.layers), ("n_embd", args.embd)) if v}).label(args.shape)
    records, path = [], None
    with TemporaryDirectory() as tmp:
        for precision in args.precisions:
            t0 = time.perf_counter()
            try:
                with servers(args.config, precision, args.streams[-1], Path(tmp)) as pair:
                    log(f"{label} {precision}: servers up in {time.perf_counter() - t0:.1f} s")
                    batch = asyncio.run(measure(args, precision, label, pair))
            except (RuntimeError, OSError, EOFError, ValueError, asyncio.TimeoutError) as e:
                raise SystemExit(f"error: {label} {precision}: {type(e).__name__}: {e}") from None
            records += batch
            if args.write:
                path = write_results(batch, command, results_dir=args.results_dir, force=args.force)
    print(format_tables(records))
    if path:
        log(f"wrote {path}")
    if args.plot:
        doc = read_results(path) if path else {"device": device_name(), "date": args.png.stem[-16:-6],
                                               "records": records}
        plot(doc, args.png, args.force)
        log(f"wrote {args.png}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # e.g. timeout(1): stop the servers on the way out
    main()
