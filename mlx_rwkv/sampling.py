"""Sampling on the device: a token costs no host sync until the caller reads it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

SEED_LIMIT = 2**64  # mx.random.key takes an unsigned 64-bit seed


@dataclass(frozen=True)
class SamplingFields:
    """How the next token is chosen, unchecked (`SamplingParams` checks the ranges; the server's
    `RowParams` gets them checked by its API layer).

    temperature 0 means greedy. top_k 0, top_p 1 and min_p 0 switch those filters off.
    Penalties follow the official RWKV pipeline: every generated token adds 1 to its count,
    all counts decay by `penalty_decay` per step, and logits drop by
    `presence_penalty + count * frequency_penalty` for every token seen so far.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 0.996

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class SamplingParams(SamplingFields):
    """`SamplingFields` with every range checked at construction (ValueError)."""

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "penalty_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not 0 < self.penalty_decay <= 1:
            raise ValueError(f"penalty_decay must be in (0, 1], got {self.penalty_decay}")


class Sampler:
    """Stateful sampler for (B, V) logits; keeps the penalty counts on the device."""

    def __init__(self, params: SamplingParams, vocab_size: int, batch_size: int = 1, seed: int | None = None,
                 banned: Sequence[int] = ()):
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.params = params
        self.vocab_size = vocab_size
        self.ban = ban_mask(banned, vocab_size)
        self.key = mx.random.key(seed) if seed is not None else None
        self.counts = mx.zeros((batch_size, vocab_size), mx.float32) if params.uses_penalties else None
        self.seen = mx.zeros((batch_size, vocab_size), mx.bool_) if params.uses_penalties else None

    def __call__(self, logits: mx.array) -> mx.array:
        """(B, V) logits -> (B,) int32 token ids; -1 marks a row whose logits were not finite."""
        p = self.params
        logits = logits.astype(mx.float32)
        finite = mx.all(mx.isfinite(logits), axis=-1)
        if self.ban is not None:
            logits = logits + self.ban
        if self.counts is not None:
            logits = logits - mx.where(self.seen, p.presence_penalty + self.counts * p.frequency_penalty, 0.0)
        if p.temperature == 0:
            tokens = mx.argmax(logits, axis=-1)
        else:
            tokens = self._sample(filter_logits(logits / p.temperature, p))
        tokens = mx.where(finite, tokens.astype(mx.int32), -1)
        if self.counts is not None:
            hit = mx.arange(self.vocab_size)[None, :] == tokens[:, None]
            self.counts = self.counts * p.penalty_decay + hit
            self.seen = self.seen | hit
        return tokens

    def _sample(self, logits: mx.array) -> mx.array:
        if self.key is None:
            return mx.random.categorical(logits, axis=-1)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logits, axis=-1, key=sub)


def ban_mask(ids: Sequence[int], vocab_size: int) -> mx.array | None:
    """An additive (V,) logit mask: -inf at `ids` (tokens that must never be sampled), else 0."""
    ids = [i for i in ids if 0 <= i < vocab_size]
    if not ids:
        return None
    mask = mx.zeros((vocab_size,), mx.float32)
    mask[mx.array(ids)] = -float("inf")
    mx.eval(mask)  # materialized here: a lazy array cannot be evaluated on another thread's stream
    return mask


def filter_logits(logits: mx.array, p: SamplingParams) -> mx.array:
    """Mask (to -inf) what top-k, top-p and min-p exclude; (B, V) in, (B, V) out."""
    neg_inf = mx.array(-float("inf"), logits.dtype)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -p.top_k][:, None]
        logits = mx.where(logits < kth, neg_inf, logits)
    if p.min_p > 0:
        probs = mx.softmax(logits, axis=-1)
        logits = mx.where(probs < p.min_p * mx.max(probs, axis=-1, keepdims=True), neg_inf, logits)
    if p.top_p < 1:
        probs = mx.softmax(logits, axis=-1)
        order = mx.argsort(-probs, axis=-1)
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        # keep a token when the mass before it is below top_p (the top token is always kept)
        keep_sorted = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < p.top_p
        keep = mx.put_along_axis(mx.zeros(probs.shape, mx.bool_), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, neg_inf)
    return logits
