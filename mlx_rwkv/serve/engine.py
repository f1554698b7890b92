"""Continuous batching over `RWKV7.step`: one decode step per token for every active sequence.

One engine thread owns the model, the batch and the prefix cache; the HTTP side only submits
requests and receives events through the `emit` callback it passes (called on the engine
thread; the app forwards them to its event loop). The loop, per iteration:

1. takes new requests and cancellations (a client that went away leaves at once);
2. prefills waiting requests, at most `prefill_chunk` tokens per iteration so a long prompt
   delays the running streams by one chunk, not by its whole length: each resumes from the
   deepest cached prefix of its prompt (`PrefixCache`), caches the state at its message ends
   (`cut_points`) and at its end, samples its first token and joins the batch;
3. runs one step for the whole batch: `model.step` on (B,) tokens, `sample_rows` with each
   row's own parameters and seed, and ONE host read of the (B,) tokens. Rows that finish leave
   (their final state goes into the cache under prompt + answer, so the next turn of a chat
   prefills only what is new); the batch is rebuilt only when its membership changed.

Row independence: every row is computed as if alone (the model's ops are row-wise), and the
sampler's randomness depends only on the row's seed and position, so a request's tokens do not
depend on the company it keeps; greedy ids are identical alone and in a batch of 32 (tested;
float reductions in a batched matmul may differ from a single-row one in the last bits, which
could only flip an exact tie).

On a GPU the compiled step is specialised per batch size, so the batch is padded to the next
power of two (at most `max_batch`): at most log2(max_batch) + 1 compilations, and decode is
memory-bound, so the idle rows cost little. On the CPU rows are not padded (they cost compute).

Failures stay with their request: an exception while preparing one request (prefill, first
token, text decoding) or non-finite logits in its row fail that request alone; an exception in
the batched step fails the rows of that step (the server keeps serving).
"""
from __future__ import annotations

import codecs
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx

from ..kernels import gpu_backend
from ..layer_kernel import barrier_error
from ..model import RWKV7
from ..state import State
from .cache import PrefixCache
from ..sampling import ban_mask
from .row_sampler import BatchParams, RowParams, sample_rows


@dataclass(frozen=True)
class Request:
    """One generation: prompt ids, sampling, limits and stop rules (validated by the caller)."""

    prompt: tuple[int, ...]
    params: RowParams
    max_tokens: int
    stop_strings: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = frozenset()
    cut_points: tuple[int, ...] = ()  # prompt lengths whose states are worth caching too


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500


Event = Delta | Done | Failed
Emit = Callable[[Event], None]


@dataclass(eq=False)
class _Seq:
    id: int
    req: Request
    emit: Emit
    state: State | None = None  # batch 1, while prefilling
    logits: mx.array | None = None  # (V,) after the prompt
    pos: int = 0  # prompt tokens already in `state`
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    token: mx.array | None = None  # (1,) the last sampled token, to feed
    counts: mx.array | None = None  # (1, V) penalty counts, when the row uses penalties
    pending: str = ""
    to_cache: list[tuple[int, State, mx.array]] = field(default_factory=list)  # computed, not yet waited for
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


class Engine:
    """The batching scheduler. `start()`, then `submit(request, emit) -> id` from any thread."""

    def __init__(self, model: RWKV7, tokenizer, *, max_batch: int = 32, cache: PrefixCache | None = None,
                 initial_state: State | None = None, prefill_chunk: int = 512, pad_batches: bool | None = None):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self._ban = ban_mask(getattr(tokenizer, "textless_ids", ()), model.config.vocab_size)  # ids without text
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.cache = cache if cache is not None else PrefixCache(0)
        self.initial_state = initial_state or model.new_state(1)
        self.initial_state.check(model.config, 1)
        mx.eval(self.initial_state.arrays())  # a lazy array made here could not be evaluated on the engine thread
        self.pad_batches = gpu_backend() is not None if pad_batches is None else pad_batches
        self.steps = 0  # batched decode steps run
        self.prefilled_tokens = 0  # prompt tokens actually run through the model
        self._cv = threading.Condition()
        self._inbox: list[_Seq] = []
        self._cancels: set[int] = set()
        self._stopping = False
        self._next_id = 0
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []  # batch rows in order once built
        self._batch_rows: list[_Seq] = []  # the rows `_state` holds, in order
        self._dirty = False
        self._state: State | None = None
        self._tokens: mx.array | None = None
        self._counts: mx.array | None = None
        self._params: BatchParams | None = None
        self._thread = threading.Thread(target=self._loop, name="mlx-rwkv-engine", daemon=True)

    # -- API (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the current iteration, fail everything still queued or running (503), join."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, request: Request, emit: Emit) -> int:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._next_id += 1
            self._inbox.append(_Seq(self._next_id, request, emit))
            self._cv.notify()
            return self._next_id

    def cancel(self, seq_id: int) -> None:
        """Drop a request (its client went away): it leaves the batch at the next step boundary."""
        with self._cv:
            self._cancels.add(seq_id)
            self._cv.notify()

    def stats(self) -> dict:
        return {"active": len(self._active), "waiting": len(self._waiting) + len(self._inbox),
                "steps": self.steps, "prefilled_tokens": self.prefilled_tokens,
                "cache": {"entries": len(self.cache), "mb": round(self.cache.nbytes / 2**20, 3),
                          "limit_mb": round(self.cache.limit_bytes / 2**20, 3), "hits": self.cache.hits,
                          "misses": self.cache.misses, "evictions": self.cache.evictions}}

    # -- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        # MLX streams belong to the thread that made them: the engine thread evaluates on its own
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        while True:
            with self._cv:
                while not (self._inbox or self._cancels or self._waiting or self._active or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
            self._waiting.extend(inbox)
            if cancels:
                self._waiting = deque(s for s in self._waiting if s.id not in cancels)
                self._leave([s for s in self._active if s.id in cancels])
            self._prefill_round()
            if self._active:
                self._decode_step()
        with self._cv:
            left = [*self._inbox, *self._waiting, *self._active]
            self._inbox, self._waiting, self._active = [], deque(), []
        for seq in left:
            _send(seq, Failed("the server is shutting down", 503))

    def _prefill_round(self) -> None:
        budget = self.prefill_chunk
        while self._waiting and budget > 0 and len(self._active) < self.max_batch:
            seq = self._waiting[0]
            try:
                budget -= self._prefill(seq, budget)
                if seq.pos == len(seq.req.prompt):
                    self._waiting.popleft()
                    self._first_token(seq)
            except Exception as e:  # noqa: BLE001 - the request fails alone
                if self._waiting and self._waiting[0] is seq:
                    self._waiting.popleft()
                _send(seq, Failed(f"generation failed: {type(e).__name__}: {e}"))

    def _prefill(self, seq: _Seq, budget: int) -> int:
        """Run up to `budget` prompt tokens of `seq` (resuming from the cache first); returns how many."""
        prompt = seq.req.prompt
        if seq.state is None:
            hit = self.cache.lookup(prompt)
            seq.pos = seq.cached = hit.length
            seq.state = hit.entry.state if hit.entry else self.initial_state
            seq.logits = hit.entry.logits if hit.entry else None
        if seq.pos == len(prompt):
            return 0
        end = min(len(prompt), seq.pos + budget, *(c for c in seq.req.cut_points if c > seq.pos))
        logits, seq.state = self.model.forward(list(prompt[seq.pos:end]), seq.state)
        n, seq.pos, seq.logits = end - seq.pos, end, logits
        self.prefilled_tokens += n
        if end == len(prompt) or end in seq.req.cut_points:
            seq.to_cache.append((end, seq.state, logits))
        if end < len(prompt) and n == budget:  # the round ends mid-prompt: bound the graph
            self._settle(seq)
        # else lazy: the segments up to the prompt's end run back to back, one wait in _first_token
        return n

    def _settle(self, seq: _Seq, *extra: mx.array) -> None:
        """Wait for `seq`'s prefill (and `extra`), then cache the states it reached at its cut
        points: only computed states enter the cache, so a failed evaluation fails its request alone."""
        mx.eval(*extra, seq.logits, seq.state.arrays(), [(state.arrays(), logits) for _, state, logits in seq.to_cache])
        for end, state, logits in seq.to_cache:
            self.cache.insert(seq.req.prompt[:end], state, logits)
        seq.to_cache = []

    def _first_token(self, seq: _Seq) -> None:
        p = seq.req.params
        counts = mx.zeros((1, self.model.config.vocab_size), mx.float32) if p.uses_penalties else None
        token, seq.counts = sample_rows(seq.logits[None], BatchParams([p]), mx.array([0], mx.uint32), counts,
                                        self._ban)
        seq.token = token
        self._settle(seq, token)  # the prompt's one wait
        self._active.append(seq)  # before the first chunk reaches the client: it may look at stats()
        self._dirty = True
        reason = self._accept(seq, token.item())
        if reason is not None:
            self._leave([seq])
            if reason != "failed":
                self._finish(seq, reason)

    def _decode_step(self) -> None:
        try:
            if self._dirty:
                self._rebuild()
            rows = self._active
            pad = len(self._batch_rows) - len(rows)
            positions = mx.array([len(s.generated) for s in rows] + [0] * pad, mx.uint32)
            logits, state = self.model.step(self._tokens, self._state)
            tokens, counts = sample_rows(logits, self._params, positions, self._counts, self._ban)
            mx.eval(tokens, state.arrays(), *([counts] if counts is not None else []))
            host = tokens.tolist()  # the one host sync of the step
        except Exception as e:  # noqa: BLE001 - the rows of this step fail, the server goes on
            for seq in self._active:
                _send(seq, Failed(f"decode step failed: {type(e).__name__}: {e}"))
            self._active, self._batch_rows, self._dirty = [], [], False
            return
        self.steps += 1
        self._state, self._tokens, self._counts = state, tokens, counts
        leaving, finished = [], []
        for i, seq in enumerate(rows):
            try:
                reason = self._accept(seq, host[i])
            except Exception as e:  # noqa: BLE001
                _send(seq, Failed(f"generation failed: {type(e).__name__}: {e}"))
                reason = "failed"
            if reason is not None:
                leaving.append(seq)
            if reason not in (None, "failed"):
                # the state after prompt + every token but the last (not fed yet), and its logits
                row = mx.array([i])
                final = State(*([mx.take(a, row, axis=0) for a in part] for part in (state.att_x, state.wkv, state.ffn_x)))
                finished.append((seq, reason, final, logits[i]))
        if finished:
            mx.eval([(final.arrays(), row_logits) for _, _, final, row_logits in finished])  # one wait for all
            broken = self._layer_kernel_gave_up()
            for seq, reason, final, row_logits in finished:
                if broken:  # its text is wrong, and so is its state: neither is kept
                    _send(seq, Failed(broken))
                    continue
                self.cache.insert(seq.req.prompt + tuple(seq.generated[:-1]), final, row_logits)
                self._finish(seq, reason)
        if leaving:
            self._leave(leaving)

    def _layer_kernel_gave_up(self) -> str | None:
        """The error of the opt-in layer kernel when one of its grid-barrier waits gave up (read
        once per step that finishes requests or meets non-finite logits, as generation does)."""
        error = barrier_error(self.model.barrier_words)
        return f"generation failed: {error}" if error else None

    def _accept(self, seq: _Seq, token: int) -> str | None:
        """Take a sampled token: emit its text; the finish reason, "failed", or None to go on."""
        if token < 0:  # the layer kernel's give-up, if that is the cause
            _send(seq, Failed(self._layer_kernel_gave_up() or "the model produced non-finite logits"))
            return "failed"
        seq.generated.append(token)
        req = seq.req
        if token in req.stop_tokens:
            self._flush(seq)
            return "stop"
        seq.pending += seq.decoder.decode(self.tokenizer.decode_bytes([token]))
        cut = min((seq.pending.find(s) for s in req.stop_strings if s in seq.pending), default=-1)
        if cut >= 0:
            if cut:
                _send(seq, Delta(seq.pending[:cut]))
            return "stop"
        if len(seq.generated) >= req.max_tokens:
            self._flush(seq)
            return "length"
        hold = max((len(s) for s in req.stop_strings), default=1) - 1  # may start a stop string
        ready = seq.pending[:max(0, len(seq.pending) - hold)]
        if ready:
            seq.pending = seq.pending[len(ready):]
            _send(seq, Delta(ready))
        return None

    def _flush(self, seq: _Seq) -> None:
        tail = seq.pending + seq.decoder.decode(b"", final=True)
        if tail:
            _send(seq, Delta(tail))

    def _finish(self, seq: _Seq, reason: str) -> None:
        _send(seq, Done(reason, len(seq.req.prompt), len(seq.generated), seq.cached))

    def _leave(self, seqs: Sequence[_Seq]) -> None:
        gone = set(seqs)
        if gone & set(self._active):
            self._active = [s for s in self._active if s not in gone]
            self._dirty = True

    def _rebuild(self) -> None:
        """Rebuild the batch arrays for `_active`: kept rows gathered from the old batch (in
        their old order), new rows appended, idle rows padded (GPU)."""
        old = {s: i for i, s in enumerate(self._batch_rows)}
        kept = [s for s in self._active if s in old]
        new = [s for s in self._active if s not in old]
        rows = kept + new
        n = len(rows)
        size = min(1 << (n - 1).bit_length(), self.max_batch) if self.pad_batches else n
        pad = size - n
        idx = mx.array([old[s] for s in kept]) if kept else None
        V = self.model.config.vocab_size

        def stack(old_arr: mx.array | None, new_rows: list[mx.array], pad_row: mx.array) -> mx.array:
            parts = [mx.take(old_arr, idx, axis=0)] if kept else []
            parts += new_rows
            if pad:
                parts.append(mx.broadcast_to(pad_row, (pad, *pad_row.shape[1:])))
            return mx.concatenate(parts, axis=0)

        parts = []
        for p, name in enumerate(("att_x", "wkv", "ffn_x")):
            olds = getattr(self._state, name) if kept else [None] * self.model.config.n_layer
            parts.append([stack(olds[i], [getattr(s.state, name)[i] for s in new], mx.zeros_like(getattr(self.initial_state, name)[i]))
                          for i in range(self.model.config.n_layer)])
        self._state = State(*parts)
        self._tokens = stack(self._tokens, [s.token for s in new], mx.zeros((1,), mx.int32))
        if any(s.req.params.uses_penalties for s in rows):
            zeros = mx.zeros((1, V), mx.float32)
            old_counts = self._counts if self._counts is not None else mx.zeros((len(self._batch_rows), V), mx.float32)
            self._counts = stack(old_counts if kept else None, [s.counts if s.counts is not None else zeros for s in new], zeros)
        else:
            self._counts = None
        self._params = BatchParams([s.req.params for s in rows] + [RowParams(temperature=0.0)] * pad)
        mx.eval(self._state.arrays(), self._tokens, *([self._counts] if self._counts is not None else []))
        for s in new:
            s.state = s.logits = s.token = s.counts = None
        self._active = rows
        self._batch_rows = rows + [None] * pad
        self._dirty = False


def _send(seq: _Seq, event: Event) -> None:
    try:
        seq.emit(event)
    except Exception:  # noqa: BLE001 - a closed event loop must not stop the engine
        pass
