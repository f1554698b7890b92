"""WorldTokenizer gives the official TRIE_TOKENIZER's ids on >= 1 MB of varied text; decoding; ByteTokenizer."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from mlx_rwkv import tokenizer as tok_mod
from mlx_rwkv.tokenizer import VOCAB_PATH, ByteTokenizer, WorldTokenizer, load_vocab
from tokenizer_corpus import corpus, varied_text

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
OFFICIAL_VOCAB = Path(rwkv_tokenizer.__file__).with_name("rwkv_vocab_v20230424.txt")
SECTIONS = corpus(seed=0, scale=2)  # about 1 MB in all


@pytest.fixture(scope="module")
def official():
    return rwkv_tokenizer.TRIE_TOKENIZER(str(OFFICIAL_VOCAB))


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


def test_shipped_vocab_is_the_official_file():
    assert VOCAB_PATH.read_bytes() == OFFICIAL_VOCAB.read_bytes()
    vocab = load_vocab()
    assert sorted(vocab) == list(range(1, 65530))
    assert WorldTokenizer().vocab_size == 65536 and WorldTokenizer.eos_id == 0


def test_corpus_is_large_and_varied():
    sizes = {name: len(text.encode("utf-8")) for name, text in SECTIONS}
    assert sum(sizes.values()) >= 1_000_000
    assert min(sizes.values()) > 5_000


@pytest.mark.parametrize("name", [name for name, _ in SECTIONS])
def test_sections_match_official(world, official, name):
    text = dict(SECTIONS)[name]
    ids = world.encode(text)
    assert ids == official.encode(text)
    assert world.decode(ids) == text


def test_one_megabyte_input_matches_official(world, official):
    text = varied_text(1_000_000, seed=7)
    data = text.encode("utf-8")
    assert len(data) >= 1_000_000
    ids = world.encode(text)
    assert ids == official.encodeBytes(data)
    assert world.decode_bytes(ids) == data


def test_random_slices_match_official(world, official):
    """Slices of every length around the numpy/Python switch and the stretch threshold."""
    rng = random.Random(1)
    text = varied_text(200_000, seed=3)
    sizes = [0, 1, 2, 3, 7, 100, tok_mod._SMALL_INPUT - 1, tok_mod._SMALL_INPUT, tok_mod._SMALL_INPUT + 1, 2000, 20_000]
    for size in sizes * 10 + [rng.randrange(1, 5000) for _ in range(200)]:
        start = rng.randrange(0, len(text) - size + 1)
        piece = text[start:start + size]
        assert world.encode(piece) == official.encode(piece), (start, size)


@pytest.mark.parametrize("stretches, walkers, small", [(1, 1, 0), (10**9, 10**9, 0), (1, 10**9, 10**9)])
def test_every_code_path_matches_official(world, official, monkeypatch, stretches, walkers, small):
    """All numpy, all Python after the cuts, all Python: the same ids."""
    monkeypatch.setattr(tok_mod, "_MIN_STRETCHES", stretches)
    monkeypatch.setattr(tok_mod, "_MIN_WALKERS", walkers)
    monkeypatch.setattr(tok_mod, "_SMALL_INPUT", small)
    text = varied_text(150_000, seed=5)
    assert world.encode(text) == official.encode(text)


def test_raw_bytes_match_official(world, official):
    """Not UTF-8 at all: random bytes, byte runs, truncated multi-byte characters."""
    rng = random.Random(2)
    chunks = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))) for _ in range(40)]
    chunks += [bytes([b]) * n for b in (0, 0x20, 0x80, 0xE4, 0xFF) for n in (1, 127, 128, 129, 1000)]
    chunks += ["中文😀".encode("utf-8")[:k] for k in range(1, 11)]
    for data in chunks + [b"".join(chunks)]:
        assert world.encode_bytes(data) == official.encodeBytes(data)
    assert world.encode_bytes(bytearray(b"ab")) == world.encode_bytes(memoryview(b"ab")) == official.encodeBytes(b"ab")


def test_every_token_alone_and_all_tokens_concatenated(world, official):
    vocab = load_vocab()
    assert all(world.encode_bytes(token) == [idx] for idx, token in vocab.items())
    tokens = list(vocab.values())
    random.Random(4).shuffle(tokens)
    data = b"".join(tokens)  # ~430 KB where every token boundary is a candidate
    assert world.encode_bytes(data) == official.encodeBytes(data)


def test_empty_and_small(world):
    assert world.encode("") == [] and world.encode_bytes(b"") == []
    assert world.decode([]) == "" and world.decode_bytes([]) == b""
    assert world.decode(world.encode("Hello, world!")) == "Hello, world!"


def test_decode_partial_characters(world):
    text = "中文 😀 é"
    ids = world.encode(text)
    byte_ids = [world.encode_bytes(bytes([b]))[0] for b in text.encode("utf-8")]
    assert world.decode(byte_ids) == text
    assert world.decode(byte_ids[:2]) == "\ufffd"  # a truncated character: one replacement
    assert world.decode(byte_ids[1:3]) == "\ufffd\ufffd"  # two stray continuation bytes
    assert world.decode_bytes(byte_ids[:2]) == "中".encode("utf-8")[:2]
    vocab = load_vocab()
    half = [i for i, t in vocab.items() if len(t) == 2 and t[0] >= 0xE0][0]  # 2 bytes of a 3-byte char
    assert world.decode([half]) == "\ufffd"
    assert world.decode_bytes([half]) == vocab[half]
    assert world.decode_bytes(np.array(ids)) == text.encode("utf-8")
    assert world.decode(tuple(ids) + (0,)) == text  # id 0, end of text, decodes to nothing
    assert world.decode_bytes([0, 0]) == b""


@pytest.mark.parametrize("bad, words", [
    ([1, 2, -1], "-1 at position 2"),
    ([65530], "not in the vocabulary"),
    ([65535], "not in the vocabulary"),
    ([5, 65536], "65536 at position 1 is out of range"),
    ([10**12], "out of range"),
    ([1, "a"], "position 1 is 'a'"),
    ([1.0], "not an int"),
    ([None], "not an int"),
])
def test_bad_ids_raise(world, bad, words):
    with pytest.raises(ValueError, match=words):
        world.decode(bad)


def test_bad_arguments_raise(world):
    with pytest.raises(TypeError, match="encode_bytes"):
        world.encode(b"bytes")
    with pytest.raises(TypeError, match="bytes"):
        world.encode_bytes("text")
    with pytest.raises(TypeError, match="sequence"):
        world.decode(5)
    with pytest.raises(TypeError, match="sequence"):
        world.decode("abc")
    with pytest.raises(TypeError, match="scalar"):
        world.decode(np.int64(5).reshape(()))
    with pytest.raises(UnicodeEncodeError):
        world.encode("lone \ud800 surrogate")


def _write_vocab(path: Path, tokens: list) -> Path:
    lines = [f"{i} {t!r} {len(t.encode('utf-8') if isinstance(t, str) else t)}" for i, t in enumerate(tokens, 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_custom_vocab_matches_official(tmp_path, official):
    """Another vocabulary (all bytes + overlapping words): same ids as the official code on it."""
    rng = random.Random(5)
    words = ["ab", "abc", "abcd", "bcd", "cd", "a b", " the", " th", "the", "  ", "    ", "中文", "文"]
    words += ["".join(rng.choice("abcd ") for _ in range(rng.randrange(2, 9))) for _ in range(300)]
    tokens = [bytes([b]) for b in range(256)] + sorted(set(words) - {chr(b) for b in range(128)})
    path = _write_vocab(tmp_path / "vocab.txt", tokens)
    ours, theirs = WorldTokenizer(path), rwkv_tokenizer.TRIE_TOKENIZER(str(path))
    assert ours.vocab_size == 64 * -(-(len(tokens) + 1) // 64)
    for _ in range(50):
        text = "".join(rng.choice(["a", "b", "c", "d", " ", "the", "中文", "文", "\n"]) for _ in range(rng.randrange(0, 3000)))
        assert ours.encode(text) == theirs.encode(text)


@pytest.mark.parametrize("line, words", [
    ("1 'ab' 3", "has 2 bytes"),
    ("1 __import__('os').system('true') 4", "not `id repr"),
    ("1 ('a', 'b') 2", "not str or bytes"),
    ("x 'a' 1", "not `id repr"),
    ("0 'zz' 2", "outside 1..65535"),
    ("1 '\\x00' 1", "duplicate"),
])
def test_bad_vocab_lines_raise(tmp_path, line, words):
    path = _write_vocab(tmp_path / "vocab.txt", [bytes([b]) for b in range(256)])
    path.write_text(path.read_text() + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=words):
        load_vocab(path)


def test_vocab_without_every_byte_raises(tmp_path):
    path = _write_vocab(tmp_path / "vocab.txt", [bytes([b]) for b in range(255)])
    with pytest.raises(ValueError, match="every single byte"):
        WorldTokenizer(path)


def test_byte_tokenizer():
    bt = ByteTokenizer()
    assert bt.vocab_size == 256 and bt.eos_id == 0
    text = "héllo 中 😀\x00"
    ids = bt.encode(text)
    assert ids == list(text.encode("utf-8")) and bt.decode(ids) == text
    assert bt.encode_bytes(b"\xff\x00") == [255, 0]
    assert bt.decode(ids[:2] + [0xE4]) == "h\ufffd\ufffd"
    assert bt.decode_bytes(np.array([0xE4, 0xB8])) == b"\xe4\xb8"
    with pytest.raises(ValueError, match="256 at position 1"):
        bt.decode([1, 256])
    with pytest.raises(ValueError, match="-1 at position 0"):
        bt.decode([-1])
    with pytest.raises(ValueError, match="'x'"):
        bt.decode([1, "x"])
    with pytest.raises(TypeError):
        bt.encode(b"x")
