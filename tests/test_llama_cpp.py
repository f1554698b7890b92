"""llama.cpp itself (through the llama-cpp-python package) loads our GGUF exports, tokenizes as
we do and computes the same logits; skipped where llama_cpp is not installed.

Where the two engines may differ: llama.cpp's CPU matmuls round the activations to the weights'
dot-product type (F16 for F16 weights, Q8_0 for Q8_0, Q8_K for Q4_K), we keep them in float32.
So F32 files agree to float rounding, F16 to ~1e-3 of the logit range, and the quantized types by
about as much as 8-bit activations move the logits (~2%), which for Q4_K is several times less
than the 4-bit weights' own effect: a layout or semantics error would show up as O(1) instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from mlx_rwkv import load  # noqa: E402
from mlx_rwkv.checkpoint import save_checkpoint  # noqa: E402
from mlx_rwkv.config import ModelConfig  # noqa: E402
from mlx_rwkv.convert import convert  # noqa: E402
from mlx_rwkv.synth import synthesize  # noqa: E402
from mlx_rwkv.tokenizer import WorldTokenizer  # noqa: E402

BYTES = ModelConfig(n_layer=2, n_embd=256, head_size=64, vocab_size=256,
                    d_decay=32, d_aaa=48, d_mv=16, d_gate=64, d_ffn=1024)
TOKENS = list(b"Hello world")
# max |llama.cpp - ours| / max |logit|, measured 8e-7, 5e-4, 1.8e-2, 1.9e-2 (see the module docstring)
BOUNDS = {"f32": 1e-5, "f16": 2e-3, "q8_0": 5e-2, "q4_k": 5e-2}


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits [T, V] for `tokens` from a fresh state."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2,
                          verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float64)


def _our_logits(path: Path, tokens: list[int]) -> np.ndarray:
    model, _ = load(path, dtype="float32")
    return np.array(model.forward(tokens, all_logits=True)[0], dtype=np.float64)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    return save_checkpoint(synthesize(BYTES, seed=3, dtype="float32"), tmp_path_factory.mktemp("llama") / "m.pth")


@pytest.mark.parametrize("out_type", list(BOUNDS))
def test_logits_match_llama_cpp(byte_model: Path, out_type: str) -> None:
    path = convert(byte_model, byte_model.with_name(f"m-{out_type}.gguf"), out_type)
    ours = _our_logits(path, TOKENS)
    theirs = _llama_logits(path, TOKENS)
    assert theirs.shape == ours.shape == (len(TOKENS), BYTES.vocab_size)
    assert np.abs(theirs - ours).max() < BOUNDS[out_type] * np.abs(ours).max()
    if out_type == "q4_k":  # the engines differ far less than Q4_K differs from the source
        source = _our_logits(byte_model, TOKENS)
        assert np.abs(theirs - ours).max() < 0.3 * np.abs(ours - source).max()


def test_byte_tokenizer(byte_model: Path) -> None:
    llm = llama_cpp.Llama(model_path=str(convert(byte_model, byte_model.with_name("t.gguf"), "f16")),
                          n_ctx=64, verbose=False)
    assert llm.tokenize(b"Hi\n\n\xff!", add_bos=False) == list(b"Hi\n\n\xff!")
    assert llm.detokenize(list(b"caf\xc3\xa9")) == "café".encode()


def test_tiny_real_model(tiny_model_path: Path, tiny_reference_logits: np.ndarray, tmp_path: Path) -> None:
    """The trained tiny model (C = 64: no Q4_K) exported as F32 gives the official package's logits
    in llama.cpp; F16 and Q8_0 agree with ours."""
    ids = [34, 105, 110]  # `"in`, the reference's prompt
    f32 = convert(tiny_model_path, tmp_path / "tiny-f32.gguf", "f32")
    np.testing.assert_allclose(_llama_logits(f32, ids)[-1], tiny_reference_logits, rtol=0, atol=1e-4)
    for out_type in ("f16", "q8_0"):
        path = convert(tiny_model_path, tmp_path / f"tiny-{out_type}.gguf", out_type)
        ours = _our_logits(path, ids)
        assert np.abs(_llama_logits(path, ids) - ours).max() < BOUNDS[out_type] * np.abs(ours).max(), out_type


def test_world_vocab(tmp_path: Path) -> None:
    """A World-vocab Q4_K export: llama.cpp tokenizes like WorldTokenizer, ends turns on "\\n\\n"
    (eot 261) and agrees with our logits."""
    config = ModelConfig(n_layer=1, n_embd=256, head_size=64, vocab_size=65536,
                         d_decay=32, d_aaa=32, d_mv=0, d_gate=64, d_ffn=1024)
    src = save_checkpoint(synthesize(config, seed=1, dtype="float16"), tmp_path / "world.safetensors")
    path = convert(src, tmp_path / "world.gguf", "q4_k")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    text = "Hello world!\n\nUser: 你好，世界 — café ü\tTabs  and spaces\x00 end"
    ids = WorldTokenizer().encode(text)
    assert llm.tokenize(text.encode(), add_bos=False) == ids
    assert llm.detokenize(ids) == text.encode()
    assert llama_cpp.llama_vocab_eot(llama_cpp.llama_model_get_vocab(llm.model)) == 261 and llm.token_eos() == 0
    assert llm.chat_format == "chat_template.default"  # our tokenizer.chat_template, not a built-in guess
    ours = _our_logits(path, ids[:12])
    assert np.abs(_llama_logits(path, ids[:12]) - ours).max() < BOUNDS["q4_k"] * np.abs(ours).max()
