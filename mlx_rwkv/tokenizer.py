"""Tokenizers: the RWKV World vocabulary (ids identical to the official one) and raw bytes.

`WorldTokenizer` encodes by greedy longest match over the UTF-8 bytes, from the left: at byte p
take the longest vocabulary token that is a prefix of data[p:], emit its id, go on after it.
That is exactly what the official `TRIE_TOKENIZER` (rwkv/rwkv_tokenizer.py) does, one byte at a
time in Python. Every single byte is a token, so each step advances. We compute the same parse
with numpy, about 8x faster on 1 MB of mixed text (python -m bench.bench_tokenizer):

1. Cuts. A byte pair (a, b) that is adjacent inside no token (57,203 of the 65,536 pairs for the
   World vocabulary, e.g. any letter followed by a space) is inside no token of the parse (each
   is a vocabulary token found in the input), so the parse has a boundary between a and b: a
   "cut". Greedy parsing is memoryless (the tokens after a boundary at p depend only on
   data[p:]), so the stretch between two consecutive cuts is parsed on its own, starting at its
   cut, and the stretches' parses concatenate to the whole parse. Longest matches are unchanged:
   a match that cannot cross the next cut is the same whether or not we stop looking there.
2. Lockstep walks. Every stretch advances by one token per numpy round. A round walks each
   stretch's current byte down a double-array trie (the child of node s on byte c is
   t = base[s] + c when check[t] == s), one byte per numpy step for all walkers at once, and keeps
   each walker's deepest node. Its token is that node's deepest ancestor-or-self that is a token,
   precomputed per node: exactly the node `TRIE.find_longest` returns. When few walkers are left
   in a step, or few stretches in a round, they finish in a Python loop over the same trie
   (numpy's per-call overhead would dominate); short inputs use only that loop. That loop
   memoizes after deep walks: the next token depends only on the next 128 (longest token) bytes,
   so runs like 4,000 spaces cost one walk.
3. Each token's id is stored at its first byte's position; reading the positions in order gives
   the ids in order.

The tests compare ids with the official tokenizer on > 2 MB of varied text and every code path.
Rejected designs: a trie compiled into one `re` pattern (exact, but ~2.5x only: `re` tries the
alternatives of a node one by one) and HF `tokenizers` WordPiece (greedy but quadratic per word,
and exact pre-splitting needs the cuts above anyway). The tokenizer is built once per process
and vocabulary file, lazily, in under a second. Id 0 is not in the vocabulary: it is the
end-of-text token (`eos_id`) and decodes to b"".
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

VOCAB_PATH = Path(__file__).with_name("rwkv_vocab_v20230424.txt")

_SMALL_INPUT = 512  # bytes: shorter inputs skip numpy
_MIN_STRETCHES = 256  # fewer active stretches than this finish in Python
_MIN_WALKERS = 16  # fewer live walkers than this in a numpy step finish in Python
_DEEP_WALK = 16  # bytes: after a walk this deep (runs of spaces...) the Python loop memoizes
_SENTINEL = 256  # padding past the end of the input: no trie edge carries it


def load_vocab(path: str | Path = VOCAB_PATH) -> dict[int, bytes]:
    """Read a vocabulary file of lines `id repr(str|bytes) byte_len` (no code is evaluated)."""
    vocab: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                first, last = line.index(" "), line.rstrip().rindex(" ")
                idx, length = int(line[:first]), int(line[last + 1:])
                value = ast.literal_eval(line[first + 1:last])
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
                raise ValueError(f"{path}:{lineno}: not `id repr(token) byte_len`: {line.rstrip()!r}") from exc
            if not isinstance(value, (str, bytes)):
                raise ValueError(f"{path}:{lineno}: token is a {type(value).__name__}, not str or bytes")
            token = value.encode("utf-8") if isinstance(value, str) else value
            if len(token) != length or not token:
                raise ValueError(f"{path}:{lineno}: token {token!r} has {len(token)} bytes, the line says {length}")
            if not 1 <= idx <= 0xFFFF:
                raise ValueError(f"{path}:{lineno}: id {idx} is outside 1..65535")
            if idx in vocab or token in seen:
                raise ValueError(f"{path}:{lineno}: duplicate id {idx} or token {token!r}")
            vocab[idx] = token
            seen[token] = idx
    missing = [b for b in range(256) if bytes((b,)) not in seen]
    if missing:
        raise ValueError(f"{path}: greedy encoding needs every single byte as a token; missing {missing[:8]}")
    return vocab


class _Trie:
    """Double-array byte trie of a vocabulary, plus the tables the encoder reads per node."""

    def __init__(self, vocab: dict[int, bytes]) -> None:
        ids = {token: idx for idx, token in vocab.items()}
        children: dict[bytes, set[int]] = {}
        pairs: set[int] = set()
        for token in ids:
            for k in range(len(token)):
                children.setdefault(token[:k], set()).add(token[k])
            pairs.update((a << 8) | b for a, b in zip(token, token[1:]))
        base = _place(children)

        size = max(base.values()) + _SENTINEL + 1  # base[s] + any byte or the sentinel is in range
        base_of, check = [0] * size, [-1] * size
        tok_id, tok_len = [0] * size, [0] * size
        stack = [(b"", 0)]
        while stack:
            prefix, node = stack.pop()
            if prefix not in base:
                continue
            b = base_of[node] = base[prefix]
            for c in children[prefix]:
                child, word = b + c, prefix + bytes((c,))
                check[child] = node
                found = ids.get(word)  # else the longest token above, as the parent knows it
                tok_id[child], tok_len[child] = (found, len(word)) if found else (tok_id[node], tok_len[node])
                stack.append((word, child))

        self.root_base = base_of[0]
        self.max_len = max(map(len, ids))
        self.base = np.array(base_of, np.int32)
        self.check = np.array(check, np.int32)
        self.tok_id = np.array(tok_id, np.uint16)  # the longest token that is a prefix of the node's bytes
        self.tok_len = np.array(tok_len, np.int64)
        self.cut_after = np.ones(1 << 16, bool)  # [a << 8 | b]: no token holds the bytes a, b adjacent
        self.cut_after[list(pairs)] = False
        self._lists = (base_of, check, [i | n << 16 for i, n in zip(tok_id, tok_len)])

    def encode(self, data: bytes) -> list[int]:
        n = len(data)
        if n < _SMALL_INPUT:
            ids: list[int] = []
            self._chase(data, 0, n, ids, [], {})
            return ids
        x = np.frombuffer(data, np.uint8)
        padded = np.full(n + self.max_len + 1, _SENTINEL, np.uint16)
        padded[:n] = x
        cut = np.ones(n + 1, bool)  # cut[p]: the parse has a token boundary before byte p
        cut[1:n] = self.cut_after[(x[:-1].astype(np.uint16) << 8) | x[1:]]
        cuts = np.flatnonzero(cut)
        out = np.zeros(n, np.uint16)  # token id by first byte; 0 = no token starts there
        pos = cuts[:-1]  # one walker per stretch, at its current byte
        while len(pos) >= _MIN_STRETCHES:
            node = self._walk(padded, pos, data)
            out[pos] = self.tok_id[node]
            pos = pos + self.tok_len[node]
            pos = pos[~cut[pos]]
        if len(pos):
            ends = cuts[np.searchsorted(cuts, pos, side="right")]
            starts: list[int] = []
            ids, memo = [], {}
            for p, end in zip(pos.tolist(), ends.tolist()):
                self._chase(data, p, end, ids, starts, memo)
            out[starts] = ids
        return out[out > 0].tolist()

    def _walk(self, padded: np.ndarray, pos: np.ndarray, data: bytes) -> np.ndarray:
        """The deepest trie node each walker reaches from data[p] (one numpy step per byte)."""
        deepest = self.root_base + padded[pos].astype(np.int32)  # every byte is a root child
        node, nxt_byte, walkers = deepest, pos + 1, None  # walkers: indices into deepest
        while True:
            child = self.base[node] + padded[nxt_byte]
            live = np.flatnonzero(self.check[child] == node)
            if len(live) < _MIN_WALKERS:
                break
            walkers = live if walkers is None else walkers[live]
            node, nxt_byte = child[live], nxt_byte[live] + 1
            deepest[walkers] = node
        if len(live):
            rest = live if walkers is None else walkers[live]
            n = len(data)
            for w, s, q in zip(rest.tolist(), child[live].tolist(), (nxt_byte[live] + 1).tolist()):
                deepest[w] = self._descend(data, s, q, n)
        return deepest

    def _descend(self, data: bytes, node: int, q: int, end: int) -> int:
        """Follow data[q:end] down from node while the trie has the edge; the last node reached."""
        base, check, _ = self._lists
        while q < end:
            child = base[node] + data[q]
            if check[child] != node:
                break
            node, q = child, q + 1
        return node

    def _chase(self, data: bytes, p: int, end: int, ids: list[int], starts: list[int], memo: dict) -> None:
        """Greedy-parse data[p:end] (end at a cut or the end of data), appending ids and starts.

        The next token depends only on the next max_len bytes: after a deep walk (long tokens, as
        in runs of spaces) that window is looked up in memo (id | length << 16) before walking.
        """
        base, check, packed = self._lists
        root, window, deep_walk, deep = self.root_base, self.max_len, _DEEP_WALK, False
        add_id, add_start = ids.append, starts.append
        while p < end:
            token = memo.get(data[p:min(p + window, end)]) if deep else None
            if token is None:
                node, q = root + data[p], p + 1
                while q < end:  # _descend, inlined: this loop is the hot path of short inputs
                    child = base[node] + data[q]
                    if check[child] != node:
                        break
                    node, q = child, q + 1
                token = packed[node]
                deep = q - p > deep_walk
                if deep:
                    memo[data[p:min(p + window, end)]] = token
            add_id(token & 0xFFFF)
            add_start(p)
            p += token >> 16


def _place(children: dict[bytes, set[int]]) -> dict[bytes, int]:
    """First-fit base of every inner node, widest first so they land while the array is empty."""
    used = bytearray(4 * len(children) + 2 * _SENTINEL)
    used[0] = 1  # the root's own slot
    base: dict[bytes, int] = {}
    resume: dict[int, int] = {}  # per child count: where its last search ended
    limit = len(used) - _SENTINEL  # a base below this keeps base + any byte inside `used`
    for prefix, kids in sorted(children.items(), key=lambda item: -len(item[1])):
        first, *rest = sorted(kids)
        slot = used.find(0, max(resume.get(len(kids), 0), first))
        while 0 <= slot < limit and any(used[slot - first + c] for c in rest):
            slot = used.find(0, slot + 1)
        if not 0 <= slot < limit:
            raise RuntimeError("double-array trie: no room left (vocabulary too large?)")
        for c in kids:
            used[slot - first + c] = 1
        resume[len(kids)] = slot
        base[prefix] = slot - first
    return base


@lru_cache(maxsize=4)
def _vocab(path: str) -> dict[int, bytes]:
    return load_vocab(path)


@lru_cache(maxsize=4)
def _trie(path: str) -> _Trie:
    return _Trie(_vocab(path))


def _id_list(ids: Iterable[int]) -> list:
    """ids as a list (accepts lists, tuples, numpy or MLX arrays, generators)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes, bytearray)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"token ids must be a sequence of ints, got {type(ids).__name__}")
    else:
        ids = list(ids)
    if not isinstance(ids, list):  # a 0-d array
        raise TypeError(f"token ids must be a sequence of ints, got the scalar {ids!r}")
    return ids


class _Tokenizer:
    vocab_size: int
    eos_id: int

    def encode_bytes(self, data: bytes) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of text's UTF-8 bytes (lone surrogates raise UnicodeEncodeError)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, got {type(text).__name__}; use encode_bytes for bytes")
        return self.encode_bytes(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class WorldTokenizer(_Tokenizer):
    """The RWKV World tokenizer (vocab 65,536): ids identical to the official TRIE_TOKENIZER.

    Id 0 is end of text (`eos_id`) and decodes to b""; ids the vocabulary lacks (negative,
    65530-65535, >= vocab_size) raise ValueError in decode. Where the official `decode` returns
    a lone "\ufffd" for any invalid UTF-8, ours replaces each bad byte sequence and keeps the rest.
    """

    eos_id = 0

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(Path(path or VOCAB_PATH).resolve())
        vocab = _vocab(self.path)
        self.vocab_size = -(-(max(vocab) + 1) // 64) * 64  # embedding rows: padded to 64 (65,536)
        self._bytes: list[bytes | None] = [None] * self.vocab_size
        self._bytes[0] = b""
        for idx, token in vocab.items():
            self._bytes[idx] = token

    @property
    def textless_ids(self) -> list[int]:
        """Ids of the embedding that have no text (65530-65535): generation never samples them."""
        return [i for i, b in enumerate(self._bytes) if b is None]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (any bytes, not only UTF-8)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"encode_bytes takes bytes, got {type(data).__name__}")
        return _trie(self.path).encode(bytes(data))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of the ids, concatenated."""
        ids = _id_list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join([self._bytes[i] for i in ids])
        except (IndexError, TypeError):
            raise ValueError(self._bad_id(ids)) from None

    def _bad_id(self, ids: list) -> str:
        for k, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, int):
                return f"token id at position {k} is {i!r}, not an int"
            if not 0 <= i < self.vocab_size:
                return f"token id {i} at position {k} is out of range [0, {self.vocab_size})"
            if self._bytes[i] is None:
                return f"token id {i} at position {k} is not in the vocabulary {Path(self.path).name}"
        return "bad token ids"


class ByteTokenizer(_Tokenizer):
    """Byte-level tokenizer (vocab 256: id = byte value), for models such as the tiny test model.

    `eos_id` is 0, the NUL byte, which decodes to b"\\x00" like any other byte.
    """

    vocab_size = 256
    eos_id = 0

    def encode_bytes(self, data: bytes) -> list[int]:
        """The byte values of data."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"encode_bytes takes bytes, got {type(data).__name__}")
        return list(bytes(data))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes with these values."""
        ids = _id_list(ids)
        try:
            return bytes(ids)
        except (ValueError, TypeError):
            bad = next((k, i) for k, i in enumerate(ids) if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 256)
            raise ValueError(f"token id {bad[1]!r} at position {bad[0]} is not a byte value 0..255") from None
