"""bench.bench_serve on the CPU: the real server (child processes) with a tiny synthetic model
(2 layers, C=64, the World vocabulary), 1 and 2 streams of a few tokens, a 200-word cached chat;
the records' content, the table, the plot, and the options' one-line errors."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from bench import bench_serve  # noqa: E402
from mlx_rwkv.config import config_for_shape  # noqa: E402
from mlx_rwkv.loading import tokenizer_for  # noqa: E402
from mlx_rwkv.serve import protocol  # noqa: E402

MAX_TOKENS = 6
TINY = ["--shape", "0.1B", "--layers", "2", "--embd", "64", "--precisions", "f32"]


def test_records_table_and_plot(tmp_path, capsys):
    bench_serve.main([*TINY, "--streams", "2", "1", "--prompt-tokens", "8", "--max-tokens", str(MAX_TOKENS),
                      "--repeats", "2", "--context", "200", "--follow-ups", "2", "--write", "--plot",
                      "--results-dir", str(tmp_path)])
    [results] = tmp_path.glob("*.json")
    doc = json.loads(results.read_text())
    assert doc["command"].startswith("python3 -m bench.bench_serve --shape 0.1B")
    records = doc["records"]
    assert {r["mode"] for r in records} == {"serve"} and {r["shape"] for r in records} == {"0.1B-L2-C64-V65536"}
    decode = {r["batch"]: r for r in records if r["strategy"] == "decode"}
    assert sorted(decode) == [1, 2]
    for n, r in decode.items():
        assert r["streams"] == n and r["tokens"] == MAX_TOKENS and r["prompt_tokens"] == 8
        assert r["stream_tokens"] == [MAX_TOKENS, MAX_TOKENS]  # ignore_eos: every stream ran to max_tokens
        assert 0 < r["tok_s_spread"][0] <= r["tok_s"] <= r["tok_s_spread"][1]
        assert 0 < r["ttft_ms_median"] <= r["ttft_ms_p90"]
    cached, uncached = (next(r for r in records if r["strategy"] == s)
                        for s in ("follow-up-cached", "follow-up-uncached"))
    assert cached["tokens"] == uncached["tokens"] > 203
    assert 203 <= cached["context"] < cached["tokens"] and uncached["context"] == 0  # "User: " 200 words "\n\n"
    assert cached["ttft_ms"] > 0 and uncached["ttft_ms"] > 0
    assert (tmp_path / f"{results.stem}-serve.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "| 0.1B-L2-C64-V65536 | f32 | 2 |" in out and "| 0.1B-L2-C64-V65536 | f32 | 1 |" in out
    assert f"| {cached['tokens']} | {cached['context']} |" in out


@pytest.mark.parametrize("argv, message", [
    (["--streams", "0"], "must be >= 1"),
    (["--max-tokens", "1"], "must be >= 2"),
    (["--embd", "100"], "multiple of 64"),
    (["--precisions", "q4k"], "q4k needs C to be a multiple of 256"),
    (["--shape", "3B"], "invalid choice"),
    (["--plot"], "exists: not replaced"),
])
def test_bad_options_one_line(argv, message, tmp_path, capsys):
    results = bench_serve.results_path(tmp_path)
    results.with_name(f"{results.stem}-serve.png").write_bytes(b"mine")
    with pytest.raises(SystemExit) as e:
        bench_serve.main([*TINY, "--results-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_ignore_eos():
    tokenizer = tokenizer_for(config_for_shape("0.1B"))
    body = {"model": "m", "prompt": [1, 2]}
    parse = lambda extra: protocol.parse("completion", {**body, **extra}, tokenizer, "m", 65536, None)  # noqa: E731
    assert parse({}).request.stop_tokens == {tokenizer.eos_id}
    assert parse({"ignore_eos": True}).request.stop_tokens == frozenset()
    with pytest.raises(protocol.APIError, match="ignore_eos must be true or false"):
        parse({"ignore_eos": 1})
