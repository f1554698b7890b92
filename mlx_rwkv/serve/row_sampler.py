"""Per-row sampling for a batch of sequences that each have their own parameters and seed.

`mlx_rwkv.sampling.Sampler` applies one `SamplingParams` to the whole batch. A server batches
unrelated requests, so here every parameter is a (B,) array and one vectorized graph samples
all rows; the caller reads the (B,) tokens once per step (the one host sync).

Semantics per row are those of `SamplingParams`: penalties as in the official pipeline
(every sampled token adds 1 to its count, counts decay by `penalty_decay` per step, logits drop
by `presence + count * frequency` for every token sampled so far), then temperature (0 = greedy),
then top-k, min-p and top-p, in that order. The three filters are thresholds on the scaled
logit, so one descending sort serves all of them (and is skipped when no row filters).

Randomness is counter-based: the Gumbel noise of row b for its n-th sampled token is a hash of
(seed_b, n, token id), and the token is argmax(z + noise) (Gumbel-max). A row's tokens therefore depend only on its own seed and logits, never on
which other requests share the batch or where its row sits (a seeded request gives the same
text alone or in a crowd). It is a different random stream from `Sampler`'s `mx.random` keys.
Gumbel-max, not inverse-CDF sampling: a batched matmul may differ from a one-row one in the last
bits of the logits, which moves every boundary of a cumulative distribution (inverse CDF then
picked another token in about 1 of 300 draws of a 64-client test) but changes an argmax only
when the two best noisy scores tie that closely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from ..sampling import SamplingFields

SEED_MASK = 2**64 - 1
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive ids over the 32-bit range


@dataclass(frozen=True)
class RowParams(SamplingFields):
    """One request's sampling parameters, in the ranges the API layer (`protocol`) checks, and
    its seed."""

    seed: int = 0

    @property
    def filters(self) -> bool:
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1 or self.min_p > 0)


class BatchParams:
    """The parameters of a batch's rows as (B,) device arrays (built when the batch changes)."""

    def __init__(self, rows: Sequence[RowParams]):
        f32 = lambda name: mx.array([getattr(r, name) for r in rows], mx.float32)  # noqa: E731
        self.temperature = f32("temperature")
        self.top_k = mx.array([r.top_k for r in rows], mx.int32)
        self.top_p, self.min_p = f32("top_p"), f32("min_p")
        self.presence, self.frequency, self.decay = f32("presence_penalty"), f32("frequency_penalty"), f32("penalty_decay")
        seeds = [r.seed & SEED_MASK for r in rows]
        self.seed_lo = mx.array([s & 0xFFFFFFFF for s in seeds], mx.uint32)
        self.seed_hi = mx.array([s >> 32 for s in seeds], mx.uint32)
        self.filters = any(r.filters for r in rows)
        self.penalized = any(r.uses_penalties for r in rows)
        self.sampled = any(r.temperature > 0 for r in rows)


def sample_rows(logits: mx.array, p: BatchParams, positions: mx.array,
                counts: mx.array | None, ban: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
    """(B, V) logits -> ((B,) int32 tokens, updated (B, V) penalty counts or None).

    positions: (B,) uint32, how many tokens each row has sampled before (the noise counter).
    counts: the rows' decayed occurrence counts, needed when any row uses penalties.
    ban: an additive (V,) mask (`sampling.ban_mask`) of tokens never to sample (ids without text).
    A row whose logits are not all finite gets token -1.
    """
    logits = logits.astype(mx.float32)
    B, V = logits.shape
    finite = mx.all(mx.isfinite(logits), axis=-1)
    if ban is not None:
        logits = logits + ban
    if counts is not None:
        logits = logits - mx.where(counts > 0, p.presence[:, None] + counts * p.frequency[:, None], 0.0)
    tokens = mx.argmax(logits, axis=-1)
    if p.sampled:
        z = logits / mx.where(p.temperature > 0, p.temperature, 1.0)[:, None]
        if p.filters:
            z = _filter(z, p)
        drawn = mx.argmax(z + _gumbel(p.seed_lo, p.seed_hi, positions, V), axis=-1)
        tokens = mx.where(p.temperature > 0, drawn, tokens)
    tokens = mx.where(finite, tokens.astype(mx.int32), -1)
    if counts is not None:
        counts = (counts * p.decay[:, None]).at[mx.arange(B), mx.maximum(tokens, 0)].add(mx.where(finite, 1.0, 0.0))
    return tokens, counts


def _filter(z: mx.array, p: BatchParams) -> mx.array:
    """Mask (to -inf) what each row's top-k, min-p and top-p exclude; (B, V) scaled logits."""
    B, V = z.shape
    neg_inf = mx.array(-math.inf, mx.float32)
    ordered = mx.sort(z, axis=-1)[:, ::-1]  # (B, V) descending
    k = mx.where(p.top_k > 0, mx.minimum(p.top_k, V), V)
    threshold = mx.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # (B, 1): the k-th largest
    # min-p: prob < min_p * max_prob  <=>  logit < max_logit + log(min_p)
    min_p_cut = mx.where(p.min_p > 0, ordered[:, 0] + mx.log(mx.maximum(p.min_p, 1e-30)), neg_inf)
    threshold = mx.maximum(threshold, min_p_cut[:, None])
    # top-p over what is left: keep a token while the mass before it is below top_p (the top one always)
    probs = mx.softmax(mx.where(ordered >= threshold, ordered, neg_inf), axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs
    kept = mx.maximum(mx.sum((before < p.top_p[:, None]) & (ordered >= threshold), axis=-1), 1)
    threshold = mx.maximum(threshold, mx.take_along_axis(ordered, (kept - 1)[:, None], axis=-1))
    return mx.where(z >= threshold, z, neg_inf)


def _mix(x: mx.array) -> mx.array:
    """A 32-bit integer hash with good avalanche (Chris Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = x * mx.array(0x7FEB352D, mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x846CA68B, mx.uint32)
    return x ^ (x >> 16)


def _gumbel(seed_lo: mx.array, seed_hi: mx.array, positions: mx.array, V: int) -> mx.array:
    """(B, V) Gumbel(0, 1) noise, a hash of (seed, position, token id): argmax(z + noise) samples
    softmax(z) exactly (the Gumbel-max trick)."""
    row = _mix(seed_lo ^ _mix(seed_hi ^ _mix(positions.astype(mx.uint32) + mx.array(_GOLDEN, mx.uint32))))
    ids = mx.arange(V, dtype=mx.uint32) * mx.array(_GOLDEN, mx.uint32)
    bits = _mix(_mix(row[:, None] ^ ids[None, :]) + row[:, None])
    u = ((bits >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -mx.log(-mx.log(u))
