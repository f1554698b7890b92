"""Text generation: a token generator, a streaming API with speed figures, and a plain one.

The decode loop keeps one step in flight (`mx.async_eval`) and reads one int per token: the
only host sync. The state after the loop has consumed every token that was yielded.
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import mlx.core as mx

from .layer_kernel import check_barriers
from .model import RWKV7
from .sampling import Sampler, SamplingParams
from .state import State


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits (overflow in a low-precision dtype, bad weights)."""


@dataclass
class GenerationChunk:
    """One step of `stream_generate`: new text (possibly empty), its token, running speeds."""

    text: str
    token: int
    prompt_tokens: int
    generated_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_mb: float
    finish_reason: str | None = None  # "length", "stop", "nonfinite" on the last chunk
    state: State | None = field(default=None, repr=False)


def generate_tokens(model: RWKV7, prompt: Sequence[int], sampler: Sampler, max_tokens: int,
                    state: State | None = None, chunk_size: int = 1024) -> Iterator[tuple[int, State]]:
    """Yield (token, state after it) pairs; token -1 means the logits were not finite."""
    logits, state = model.forward(list(prompt), state, chunk_size=chunk_size)
    y = sampler(logits[None])
    mx.async_eval(y, *state.arrays())
    for _ in range(max_tokens):
        next_logits, next_state = model.step(y, state)
        next_y = sampler(next_logits)
        mx.async_eval(next_y, *next_state.arrays())
        yield y.item(), next_state
        y, state = next_y, next_state


def stream_generate(model: RWKV7, tokenizer, prompt: str | Sequence[int], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, *, state: State | None = None,
                    stop_tokens: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                    seed: int | None = None, on_nonfinite: str = "raise",
                    chunk_size: int = 1024) -> Iterator[GenerationChunk]:
    """Stream text for `prompt` (a string, or token ids). Stops at max_tokens, a stop token or
    a stop string (which is not emitted). The last chunk carries `finish_reason` and the state.
    """
    if on_nonfinite not in ("raise", "stop"):
        raise ValueError("on_nonfinite must be 'raise' or 'stop'")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("empty prompt: give at least one token of text")
    if stop_tokens is None:  # the tokenizer's end of text (World: id 0), if it has one
        stop_tokens = [] if getattr(tokenizer, "eos_id", None) is None else [tokenizer.eos_id]
    V = model.config.vocab_size
    bad = [t for t in stop_tokens if not 0 <= t < V]
    if bad:
        raise ValueError(f"stop token {bad[0]} is outside this model's vocabulary (0..{V - 1})")
    stops = set(stop_tokens)
    barriers = getattr(model, "barrier_words", None)  # (the WebGPU engine has no layer kernel)
    sampler = Sampler(sampling or SamplingParams(), model.config.vocab_size, seed=seed,
                      banned=getattr(tokenizer, "textless_ids", ()))  # ids that have no text
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    hold = max((len(s) for s in stop_strings), default=1) - 1  # text that may start a stop string
    pending, emitted, flush = "", 0, True
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    t_first = None
    reason = "length"
    last_state = state
    for n, (token, step_state) in enumerate(generate_tokens(model, ids, sampler, max_tokens, state, chunk_size)):
        now = time.perf_counter()
        t_first = t_first or now
        if token < 0:
            check_barriers(barriers)  # the layer kernel's give-up, if that is the cause
            if on_nonfinite == "raise":
                raise NonFiniteLogitsError(f"non-finite logits after {len(ids) + n} tokens")
            reason = "nonfinite"
            break
        last_state = step_state
        if token in stops:
            reason = "stop"
            break
        pending += decoder.decode(tokenizer.decode_bytes([token]))
        cut = min((pending.find(s) for s in stop_strings if s in pending), default=-1)
        if cut >= 0:
            pending, reason, flush = pending[:cut], "stop", False
            break
        ready = pending[: max(0, len(pending) - hold)]
        pending = pending[len(ready):]
        emitted = n + 1
        yield GenerationChunk(ready, token, len(ids), emitted, len(ids) / (t_first - t0),
                              n / (now - t_first) if n else 0.0, mx.get_peak_memory() / 2**20)
    tail = pending + decoder.decode(b"", final=True) if flush else pending
    check_barriers(barriers)  # the opt-in layer kernel: one read per generation
    now = time.perf_counter()
    t_first = t_first or now
    yield GenerationChunk(tail, -1, len(ids), emitted, len(ids) / (t_first - t0),
                          max(emitted - 1, 0) / (now - t_first) if emitted > 1 else 0.0,
                          mx.get_peak_memory() / 2**20, finish_reason=reason, state=last_state)


def generate(model: RWKV7, tokenizer, prompt: str | Sequence[int], max_tokens: int = 256,
             sampling: SamplingParams | None = None, **kwargs) -> str:
    """The generated text for `prompt` (see `stream_generate` for the options)."""
    return "".join(c.text for c in stream_generate(model, tokenizer, prompt, max_tokens, sampling, **kwargs))
