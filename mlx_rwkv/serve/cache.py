"""Prefix-state cache: a radix tree over token ids whose nodes hold RNN states, bounded in bytes.

An RWKV state after tokens t_1..t_n summarises all of them in a constant size, so a request
whose prompt starts with a cached prefix resumes from that state and prefills only the rest
(a transformer server would have to keep a KV cache that grows with n). An entry holds the
state (batch 1, MLX arrays on the device: resuming needs no copy) and the logits after its last
token, so a prompt that equals a cached prefix needs no prefill at all.

Structure: each node's edge is a tuple of token ids (runs without branches are one node);
`lookup(tokens)` walks down and returns the deepest entry on the path; `insert` splits edges
where needed. Eviction is least-recently-used over entries (a lookup that returns an entry
refreshes it) until the stored bytes fit `limit_bytes`; emptied leaves are pruned and
single-child chains merged again. MLX arrays are immutable values, so sharing an entry with a
running sequence is safe: the engine never writes into it. Not thread-safe: only the engine
thread uses it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx

from ..state import State


@dataclass
class Entry:
    state: State  # batch 1
    logits: mx.array  # (V,) after the last token of the prefix
    nbytes: int


@dataclass(eq=False)
class _Node:
    edge: tuple[int, ...]
    parent: "_Node | None"
    children: dict[int, "_Node"] = field(default_factory=dict)  # first token of the child's edge -> child
    entry: Entry | None = None


@dataclass
class Hit:
    """The deepest cached prefix of a prompt: its length, state and logits (None: no entry)."""

    length: int
    entry: Entry | None


class PrefixCache:
    """States keyed by token prefixes, at most `limit_bytes` of them (0 disables the cache)."""

    def __init__(self, limit_bytes: int):
        if limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.nbytes = 0
        self._root = _Node((), None)
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # nodes with entries, oldest first
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, tokens: Sequence[int]) -> Hit:
        """The longest cached prefix of `tokens` (it may be all of them); refreshes its entry."""
        node, depth, best, best_depth = self._root, 0, None, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None or tuple(tokens[depth:depth + len(child.edge)]) != child.edge:
                break
            node, depth = child, depth + len(child.edge)
            if node.entry is not None:
                best, best_depth = node, depth
        if best is None:
            self.misses += 1
            return Hit(0, None)
        self.hits += 1
        self._lru.move_to_end(best)
        return Hit(best_depth, best.entry)

    def insert(self, tokens: Sequence[int], state: State, logits: mx.array) -> bool:
        """Cache the state after `tokens` (batch 1) with its logits (V,); False when it cannot
        fit (the cache is off, or one entry is larger than the whole budget)."""
        if state.batch_size != 1:
            raise ValueError(f"cache entries hold batch-1 states, got batch {state.batch_size}")
        nbytes = sum(a.nbytes for a in state.arrays()) + logits.nbytes
        if not tokens or nbytes > self.limit_bytes:
            return False
        node = self._node_for(tuple(tokens))
        if node.entry is not None:
            self.nbytes -= node.entry.nbytes
        node.entry = Entry(state, logits, nbytes)
        self.nbytes += nbytes
        self._lru[node] = None
        self._lru.move_to_end(node)
        self._evict(keep=node)
        return True

    def clear(self) -> None:
        for node in list(self._lru):
            self._drop(node)

    # -- tree surgery --------------------------------------------------------------------
    def _node_for(self, tokens: tuple[int, ...]) -> _Node:
        """The node whose path spells `tokens`, creating and splitting nodes as needed."""
        node, depth = self._root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                leaf = _Node(tokens[depth:], node)
                node.children[tokens[depth]] = leaf
                return leaf
            common = _common_length(child.edge, tokens[depth:])
            if common < len(child.edge):  # split the edge: node -> mid -> child
                mid = _Node(child.edge[:common], node, {child.edge[common]: child})
                node.children[tokens[depth]] = mid
                child.edge, child.parent = child.edge[common:], mid
                child = mid
            node, depth = child, depth + common
        return node

    def _evict(self, keep: _Node) -> None:
        while self.nbytes > self.limit_bytes:
            oldest = next(iter(self._lru))
            if oldest is keep:  # the new entry alone fits (checked in insert): evict the next one
                self._lru.move_to_end(keep)
                continue
            self._drop(oldest)
            self.evictions += 1

    def _drop(self, node: _Node) -> None:
        self.nbytes -= node.entry.nbytes
        node.entry = None
        del self._lru[node]
        # prune entry-less leaves upwards, then merge a remaining single-child chain
        while node.parent is not None and node.entry is None and not node.children:
            del node.parent.children[node.edge[0]]
            node = node.parent
        if node.parent is not None and node.entry is None and len(node.children) == 1:
            (child,) = node.children.values()
            child.edge, child.parent = node.edge + child.edge, node.parent
            node.parent.children[node.edge[0]] = child


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
