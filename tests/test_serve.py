"""`mlx-rwkv serve`: a real uvicorn server on a free loopback port, the official `openai` client
and raw HTTP; a tiny synthetic World-vocabulary model (2 layers, C=64) on the CPU.

Covers the endpoints, SSE framing, OpenAI error shapes and statuses, usage with cached tokens,
stop strings, the prefix cache (tokens prefilled are counted), LRU eviction, greedy and seeded
output identical alone vs in a crowd of 64 clients, disconnects freeing their slot, failures
staying with their request, tuned state files vs the official `rwkv` package, CLI arguments.
"""
from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from mlx_rwkv.checkpoint import save_checkpoint  # noqa: E402
from mlx_rwkv.config import config_for_shape  # noqa: E402
from mlx_rwkv.loading import build_model, tokenizer_for  # noqa: E402
from mlx_rwkv.serve import add_serve_arguments  # noqa: E402
from mlx_rwkv.serve.app import make_app  # noqa: E402
from mlx_rwkv.serve.cache import PrefixCache  # noqa: E402
from mlx_rwkv.serve.chat_format import encode_chat, message_texts  # noqa: E402
from mlx_rwkv.serve.engine import Engine  # noqa: E402
from mlx_rwkv.serve.row_sampler import BatchParams, RowParams, sample_rows  # noqa: E402
from mlx_rwkv.state import State, StateError  # noqa: E402
from mlx_rwkv.state_files import load_state_file, load_tuned_state  # noqa: E402
from mlx_rwkv.synth import synthesize  # noqa: E402

MODEL_ID = "tiny-world"
CONFIG = config_for_shape("0.1B", n_layer=2, n_embd=64)  # the World vocabulary, one head


@pytest.fixture(scope="module")
def weights():
    return synthesize(CONFIG, seed=7)


@pytest.fixture(scope="module")
def model(weights):
    return build_model(weights, CONFIG, "float32")


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for(CONFIG)


@contextmanager
def serving(model, tokenizer, *, api_key=None, max_batch=32, cache_mb=64.0, max_prompt_tokens=4096,
            initial_state=None, pad_batches=False):
    """A uvicorn server on a free loopback port in a thread; yields (port, engine)."""
    engine = Engine(model, tokenizer, max_batch=max_batch, cache=PrefixCache(int(cache_mb * 2**20)),
                    initial_state=initial_state, prefill_chunk=64, pad_batches=pad_batches)
    app = make_app(engine, tokenizer, MODEL_ID, api_key=api_key, max_prompt_tokens=max_prompt_tokens)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port, engine
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def live(model, tokenizer):
    with serving(model, tokenizer) as (port, engine):
        yield port, engine


def post(port: int, path: str, body, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else {}


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def sse(port: int, body: dict) -> list[str]:
    """The `data:` payloads of a streamed request, in order."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions" if "messages" in body else "/v1/completions",
                 body=json.dumps({**body, "stream": True}), headers={"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    text = r.read().decode()
    conn.close()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def complete(port: int, prompt, max_tokens: int = 12, **params) -> dict:
    status, body = post(port, "/v1/completions", {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0, **params})
    assert status == 200, body
    return body


# ---- endpoints -----------------------------------------------------------------------------

def test_models_and_health(live):
    port, _ = live
    status, body = get(port, "/v1/models")
    assert status == 200 and body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL_ID]
    assert get(port, f"/v1/models/{MODEL_ID}")[1]["id"] == MODEL_ID
    status, health = get(port, "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == MODEL_ID and "cache" in health


def test_completion_shape_usage_and_length(live, tokenizer):
    port, _ = live
    body = complete(live[0], "The quick brown fox", max_tokens=7)
    assert body["object"] == "text_completion" and body["model"] == MODEL_ID
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    n_prompt = len(tokenizer.encode("The quick brown fox"))
    assert body["usage"]["prompt_tokens"] == n_prompt and body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == n_prompt + 7
    assert "cached_tokens" in body["usage"]["prompt_tokens_details"]


def test_streaming_matches_non_streaming_and_ends_with_done(live):
    port, _ = live
    req = {"model": MODEL_ID, "prompt": "Streaming test", "max_tokens": 10, "temperature": 0,
           "stream_options": {"include_usage": True}}
    whole = complete(port, "Streaming test", max_tokens=10)["choices"][0]["text"]
    events = sse(port, req)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10

    chat = sse(port, {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                      "temperature": 0})
    assert chat[-1] == "[DONE]"
    first = json.loads(chat[0])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_token_id_prompts_equal_text_prompts(live, tokenizer):
    port, _ = live
    ids = tokenizer.encode("Token ids work too")
    assert complete(port, ids)["choices"][0]["text"] == complete(port, "Token ids work too")["choices"][0]["text"]


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, param", [
    (None, 400, None),  # malformed JSON
    ({"prompt": "x"}, 400, "model"),
    ({"model": MODEL_ID}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL_ID, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL_ID, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL_ID, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL_ID, "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": MODEL_ID, "prompt": "x", "top_p": -0.1}, 400, "top_p"),
    ({"model": MODEL_ID, "prompt": "x", "top_k": -1}, 400, "top_k"),
    ({"model": MODEL_ID, "prompt": "x", "min_p": 1}, 400, "min_p"),
    ({"model": MODEL_ID, "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": MODEL_ID, "prompt": "x", "temperature": float("nan")}, 400, "temperature"),  # json: NaN
    ({"model": MODEL_ID, "prompt": "x", "presence_penalty": float("nan")}, 400, "presence_penalty"),
    ({"model": MODEL_ID, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL_ID, "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": MODEL_ID, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": MODEL_ID, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": MODEL_ID, "prompt": [70000]}, 400, "prompt"),
    ({"model": MODEL_ID, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL_ID, "prompt": "x", "stream": "yes"}, 400, "stream"),
])
def test_bad_completion_requests(live, body, status, param):
    port, _ = live
    got, err = post(port, "/v1/completions", body, raw=b"{not json" if body is None else None)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
])
def test_bad_chat_requests(live, messages, param):
    got, err = post(live[0], "/v1/chat/completions", {"model": MODEL_ID, "messages": messages})
    assert got == 400 and err["error"]["param"] == param, err


def test_routes_limits_and_the_server_keeps_serving(model, tokenizer):
    with serving(model, tokenizer, max_prompt_tokens=8) as (port, _):
        status, err = post(port, "/v1/completions", {"model": MODEL_ID, "prompt": "word " * 20})
        assert status == 400 and err["error"]["code"] == "context_length_exceeded"
        assert get(port, "/v1/nothing")[0] == 404
        assert get(port, "/v1/completions")[0] == 405
        assert get(port, "/v1/models/other")[0] == 404
        assert complete(port, "still fine", max_tokens=3)["choices"][0]["finish_reason"] == "length"


def test_api_key(model, tokenizer):
    with serving(model, tokenizer, api_key="s3cret") as (port, _):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            status, err = get(port, "/v1/models", headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
            assert post(port, "/v1/completions", {"model": MODEL_ID, "prompt": "x"}, headers)[0] == 401
        assert get(port, "/v1/models", {"authorization": "Bearer s3cret"})[0] == 200
        assert get(port, "/health")[0] == 200
        status, _ = post(port, "/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 2},
                         {"authorization": "Bearer s3cret"})
        assert status == 200


# ---- stops, chat format -----------------------------------------------------------------------

def test_stop_strings_cut_the_text_and_finish_with_stop(live):
    port, _ = live
    full = complete(port, "Stop strings", max_tokens=24)["choices"][0]["text"]
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    body = complete(port, "Stop strings", max_tokens=24, stop=[stop, "\x00never"])
    assert body["choices"][0]["text"] == full[:full.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    streamed = sse(port, {"model": MODEL_ID, "prompt": "Stop strings", "max_tokens": 24, "temperature": 0,
                          "stop": stop})
    chunks = [json.loads(e) for e in streamed[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_format_is_the_world_convention(tokenizer):
    messages = [("system", "Be brief."), ("user", "Hi\n\n\nthere  "), ("assistant", " Hello."), ("user", "Bye")]
    assert "".join(message_texts(messages)) == \
        "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
    ids, cuts = encode_chat(tokenizer, messages)
    assert tokenizer.decode(ids) == "".join(message_texts(messages))
    assert cuts == [len(encode_chat(tokenizer, messages[:i + 1])[0]) - len(tokenizer.encode("Assistant:"))
                    for i in range(len(messages))]


# ---- the prefix cache ---------------------------------------------------------------------------

def test_second_chat_turn_prefills_only_the_new_tokens(model, tokenizer):
    with serving(model, tokenizer) as (port, engine):
        turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
        status, r1 = post(port, "/v1/chat/completions", {"model": MODEL_ID, "messages": turn1, "max_tokens": 6,
                                                         "temperature": 0})
        assert status == 200 and r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        answer = r1["choices"][0]["message"]["content"]
        before = engine.prefilled_tokens
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another."}]
        status, r2 = post(port, "/v1/chat/completions", {"model": MODEL_ID, "messages": turn2, "max_tokens": 6,
                                                         "temperature": 0})
        assert status == 200
        prompt2, _ = encode_chat(tokenizer, [(m["role"], m["content"]) for m in turn2])
        cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        # the first turn's prompt is cached at least; the answer too when it re-tokenizes the same way
        assert cached >= r1["usage"]["prompt_tokens"]
        assert engine.prefilled_tokens - before == len(prompt2) - cached == r2["usage"]["prompt_tokens"] - cached
        # the same conversation again: nothing to prefill
        before = engine.prefilled_tokens
        status, r3 = post(port, "/v1/chat/completions", {"model": MODEL_ID, "messages": turn2, "max_tokens": 6,
                                                         "temperature": 0})
        assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt2)
        assert engine.prefilled_tokens == before
        assert r3["choices"][0]["message"]["content"] == r2["choices"][0]["message"]["content"]


def test_cached_prefix_gives_the_same_logits_as_a_full_prefill(model, tokenizer):
    prompt = tokenizer.encode("A shared prefix and then some more text")
    with serving(model, tokenizer) as (port, engine):
        cold = complete(port, prompt[:5], max_tokens=1)  # caches the state after 5 tokens
        warm = complete(port, prompt, max_tokens=10)
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 5
    with serving(model, tokenizer, cache_mb=0) as (port, engine):
        off = complete(port, prompt, max_tokens=10)
        assert off["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and len(engine.cache) == 0
    assert warm["choices"][0]["text"] == off["choices"][0]["text"]


def _state(value: float) -> State:
    s = State.zeros(CONFIG, 1, mx.float32)
    return State([a + value for a in s.att_x], s.wkv, s.ffn_x)


def test_radix_tree_lookup_split_and_lru_eviction():
    entry_bytes = sum(a.nbytes for a in _state(0).arrays()) + 4 * 8
    cache = PrefixCache(3 * entry_bytes)
    logits = mx.zeros((8,), mx.float32)
    assert cache.insert((1, 2, 3, 4), _state(1), logits)
    assert cache.insert((1, 2, 9), _state(2), logits)  # splits the edge (1, 2, 3, 4) at 2
    assert cache.insert((1, 2), _state(3), logits)  # an entry on the split node
    assert cache.lookup((1, 2, 3, 4, 5)).length == 4
    assert cache.lookup((1, 2, 3)).length == 2
    assert cache.lookup((1, 2, 9)).length == 3
    assert cache.lookup((7,)).entry is None and cache.lookup((1,)).entry is None
    assert float(cache.lookup((1, 2, 9, 9)).entry.state.att_x[0][0, 0]) == 2
    # LRU: (1, 2, 3, 4) is the least recently used now; a fourth entry evicts it
    cache.lookup((1, 2, 9))
    cache.lookup((1, 2))
    assert cache.insert((5, 6), _state(4), logits)
    assert len(cache) == 3 and cache.evictions == 1 and cache.nbytes <= cache.limit_bytes
    assert cache.lookup((1, 2, 3, 4)).length == 2  # falls back to the prefix (1, 2)
    assert not PrefixCache(entry_bytes - 1).insert((1,), _state(0), logits)  # larger than the budget


def test_lru_eviction_under_a_tiny_cache_mb(model, tokenizer):
    entry_mb = (sum(a.nbytes for a in model.new_state(1).arrays()) + 4 * CONFIG.vocab_size) / 2**20
    with serving(model, tokenizer, cache_mb=2.5 * entry_mb) as (port, engine):
        prompts = [f"Prompt number {i} is here" for i in range(4)]
        for p in prompts:
            complete(port, p, max_tokens=1)  # one entry each (the prompt; no decode step)
        assert len(engine.cache) == 2 and engine.cache.evictions == 2
        assert complete(port, prompts[-1], max_tokens=1)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert complete(port, prompts[0], max_tokens=1)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert get(port, "/health")[1]["cache"]["mb"] <= 2.5 * entry_mb + 1e-3


# ---- batching ---------------------------------------------------------------------------------

def test_64_concurrent_clients_get_their_own_answers(model, tokenizer):
    """Greedy and seeded requests: the same text and token counts alone and among 64 clients."""
    openai = pytest.importorskip("openai")
    requests = [dict(prompt=f"Client {i} says", max_tokens=8 + i % 5,
                     **({"temperature": 0} if i % 2 else {"temperature": 0.9, "top_p": 0.8, "seed": i,
                                                           "presence_penalty": 0.3 * (i % 3)}))
                for i in range(64)]
    with serving(model, tokenizer, max_batch=32, cache_mb=0) as (port, engine):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        def ask(r: dict) -> tuple[str, int]:
            out = client.completions.create(model=MODEL_ID, **r)
            return out.choices[0].text, out.usage.completion_tokens

        alone = [ask(r) for r in requests]
        steps_alone = engine.steps
        with ThreadPoolExecutor(64) as pool:
            crowd = list(pool.map(ask, requests))
        steps_crowd = engine.steps - steps_alone
    assert crowd == alone
    assert steps_crowd < steps_alone / 4, "the crowd should decode in shared steps"


def test_greedy_ids_identical_alone_and_in_a_padded_batch_of_32(model, tokenizer):
    """The engine directly (no HTTP): token ids, with GPU-style padding of the batch."""
    import queue

    from mlx_rwkv.serve.engine import Delta, Request

    def run(engine: Engine, reqs: list[Request]) -> list[str]:
        queues = [queue.Queue() for _ in reqs]
        for r, q in zip(reqs, queues):
            engine.submit(r, q.put)
        out = []
        for q in queues:
            text = ""
            while isinstance(ev := q.get(timeout=120), Delta):
                text += ev.text
            out.append((text, ev))
        return out

    reqs = [Request(tuple(tokenizer.encode(f"Row {i}:")), RowParams(temperature=0), 10) for i in range(27)]
    engine = Engine(model, tokenizer, max_batch=32, pad_batches=True)
    engine.start()
    try:
        alone = [run(engine, [r])[0] for r in reqs[:5]]
        together = run(engine, reqs)
    finally:
        engine.stop()
    assert together[:5] == alone


def test_disconnect_mid_stream_frees_the_slot(live):
    port, engine = live
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": MODEL_ID, "prompt": "Go on", "stream": True,
                                                             "max_tokens": 100000}),
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    assert r.readline().startswith(b"data: ")
    assert engine.stats()["active"] == 1
    conn.sock.close()
    conn.close()
    deadline = time.time() + 10
    while engine.stats()["active"]:
        assert time.time() < deadline, "the disconnected stream still holds its batch slot"
        time.sleep(0.05)


def test_a_request_that_raises_fails_alone(model, tokenizer, monkeypatch):
    bad = tokenizer.encode("poison")
    forward = model.forward

    def faulty(tokens, state=None, **kw):
        if list(tokens) == bad:
            raise RuntimeError("planted fault")
        return forward(tokens, state, **kw)

    with serving(model, tokenizer, cache_mb=0) as (port, _):
        monkeypatch.setattr(model, "forward", faulty)
        with ThreadPoolExecutor(3) as pool:
            good = [pool.submit(complete, port, f"fine {i}", 6) for i in range(2)]
            status, err = post(port, "/v1/completions", {"model": MODEL_ID, "prompt": bad, "max_tokens": 4})
            results = [g.result() for g in good]
        assert status == 500 and "planted fault" in err["error"]["message"] and err["error"]["type"] == "server_error"
        assert all(r["usage"]["completion_tokens"] == 6 for r in results)


def test_a_prefill_that_fails_at_its_wait_caches_nothing(weights, tokenizer, monkeypatch):
    """A prompt's segments run lazily up to one wait (on a GPU; here a float16 model, which runs
    as lazy MLX ops on the CPU too); when that wait fails, none of the states it would have
    reached enters the prefix cache (they were never computed), and the same request then succeeds."""
    model = build_model(weights, CONFIG, "float16")
    assert not model.on_host
    bad = tokenizer.encode("a poisoned prompt")
    forward, evaluate, armed = model.forward, mx.eval, []

    def arming(tokens, state=None, **kw):
        if list(tokens) == bad:
            armed.append(True)
        return forward(tokens, state, **kw)

    def failing_eval(*args):
        if armed:
            armed.clear()
            raise RuntimeError("planted evaluation fault")
        return evaluate(*args)

    with serving(model, tokenizer, cache_mb=64) as (port, engine):
        monkeypatch.setattr(model, "forward", arming)
        monkeypatch.setattr(mx, "eval", failing_eval)
        status, err = post(port, "/v1/completions", {"model": MODEL_ID, "prompt": bad, "max_tokens": 4})
        assert status == 500 and "planted evaluation fault" in err["error"]["message"]
        assert engine.cache.lookup(bad).length == 0
        monkeypatch.setattr(model, "forward", forward)
        assert complete(port, bad, 4)["usage"]["completion_tokens"] == 4
        assert engine.cache.lookup(bad).length == len(bad)


def test_openai_client_chat_and_completions_stream_and_not(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{live[0]}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason in ("stop", "length")
    parts, usage = [], None
    for ch in client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        usage = ch.usage or usage
    assert "".join(parts) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens  # the same prompt again
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert text == client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=5, temperature=0).choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="x", temperature=5)


# ---- sampling ---------------------------------------------------------------------------------

def test_row_sampler_rows_are_independent_of_their_batch():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(6, 300)).astype(np.float32) * 3)
    rows = [RowParams(temperature=0), RowParams(temperature=1, seed=1), RowParams(temperature=0.7, top_k=5, seed=2),
            RowParams(temperature=1, top_p=0.5, seed=3), RowParams(temperature=1, min_p=0.2, seed=4),
            RowParams(temperature=1, top_k=1, seed=5)]
    positions = mx.array([3] * 6, mx.uint32)
    together, _ = sample_rows(logits, BatchParams(rows), positions, None)
    alone = [sample_rows(logits[i:i + 1], BatchParams([r]), positions[:1], None)[0].item() for i, r in enumerate(rows)]
    assert together.tolist() == alone
    assert alone[5] == int(mx.argmax(logits[5]))  # top_k 1 is greedy
    top5 = set(np.argsort(-np.array(logits[2]))[:5].tolist())
    draws = [sample_rows(logits[2:3], BatchParams([rows[2]]), mx.array([n], mx.uint32), None)[0].item()
             for n in range(50)]
    assert set(draws) <= top5 and len(set(draws)) > 1


def test_row_sampler_penalties_follow_the_official_pipeline():
    logits = mx.array([[5.0, 4.9, 0.0, -1.0]])
    p = BatchParams([RowParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5, penalty_decay=0.5)])
    counts = mx.zeros((1, 4))
    first, counts = sample_rows(logits, p, mx.array([0], mx.uint32), counts)
    second, counts = sample_rows(logits, p, mx.array([1], mx.uint32), counts)
    assert first.item() == 0 and second.item() == 1  # token 0 lost 1 + 1 * 0.5
    assert np.allclose(np.array(counts), [[0.5, 1.0, 0, 0]])
    nan = sample_rows(mx.array([[float("nan"), 1.0]]), BatchParams([RowParams()]), mx.array([0], mx.uint32), None)[0]
    assert nan.item() == -1


# ---- state files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned_file(tmp_path_factory, weights):
    """A state-tuning file as RWKV-PEFT writes it (torch.save of bfloat16 time_state tensors)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    H, N = CONFIG.n_head, CONFIG.head_size
    states = {f"blocks.{i}.att.time_state": torch.tensor(rng.normal(size=(H, N, N)).astype(np.float32) * 0.3,
                                                          dtype=torch.bfloat16) for i in range(CONFIG.n_layer)}
    path = tmp_path_factory.mktemp("tuned") / "state.pth"
    torch.save(states, path)
    return path, {k: v.float().numpy() for k, v in states.items()}


def test_tuned_state_matches_the_official_package(tuned_file, weights, model, official_rwkv, tmp_path):
    import torch

    path, states = tuned_file
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(weights, ckpt)
    official = official_rwkv(model=str(ckpt.with_suffix("")), strategy="cpu fp32")
    C = CONFIG.n_embd
    # the official x070 state list, time_state used as S[v, k] as RWKV-Runner does for v7
    state = []
    for i in range(CONFIG.n_layer):
        state += [torch.zeros(C), torch.tensor(states[f"blocks.{i}.att.time_state"]), torch.zeros(C)]
    tokens = [510, 33, 4000, 11, 261, 65000]
    theirs, _ = official.forward(tokens, state)
    ours, _ = model.forward(tokens, State.load_tuned(path, model))
    untuned, _ = model.forward(tokens)
    theirs = theirs.double().numpy()
    err = np.abs(np.array(ours, dtype=np.float64) - theirs).max() / np.abs(theirs).max()
    assert err < 1e-4, err
    assert np.abs(np.array(untuned) - theirs).max() / np.abs(theirs).max() > 1e-2  # the state matters
    transposed = State.load_tuned(path, model)
    transposed = State(transposed.att_x, [mx.swapaxes(w, -1, -2) for w in transposed.wkv], transposed.ffn_x)
    wrong, _ = model.forward(tokens, transposed)
    assert np.abs(np.array(wrong) - theirs).max() / np.abs(theirs).max() > 1e-2  # the layout is tested


def test_state_files_refuse_other_models_and_load_ours(tuned_file, model, tmp_path):
    path, _ = tuned_file
    other = build_model(synthesize(config_for_shape("0.1B", n_layer=3, n_embd=64), seed=1),
                        config_for_shape("0.1B", n_layer=3, n_embd=64), "float32")
    with pytest.raises(StateError, match="blocks.0..2"):
        load_tuned_state(path, other)
    with pytest.raises(StateError, match="not a readable"):
        load_tuned_state(Path(__file__), model)
    ours = tmp_path / "saved.safetensors"
    _, s = model.forward([1, 2, 3])
    s.save(ours, model)
    assert np.array_equal(np.array(load_state_file(ours, model).wkv[1]), np.array(s.wkv[1]))
    assert np.array_equal(np.array(load_state_file(path, model).wkv[0]), np.array(load_tuned_state(path, model).wkv[0]))


def test_server_starts_every_request_from_the_initial_state(tuned_file, model, tokenizer):
    initial = load_tuned_state(tuned_file[0], model)
    prompt = tokenizer.encode("From the tuned state")
    logits, _ = model.forward(prompt, initial)
    with serving(model, tokenizer, initial_state=initial) as (port, _):
        first = complete(port, prompt, max_tokens=1)
    assert tokenizer.decode([int(mx.argmax(logits))]) == first["choices"][0]["text"]


# ---- CLI arguments ------------------------------------------------------------------------------

def test_serve_argument_defaults():
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args([])
    assert (args.host, args.port, args.max_batch, args.cache_mb, args.model) == ("127.0.0.1", 8000, 32, 2048.0, None)
    assert all(a.help for a in p._actions)


def test_a_taken_port_or_unknown_host_is_one_line_before_loading():
    import socket

    from mlx_rwkv.serve.command import check_listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_listen("127.0.0.1", port)
    with pytest.raises(ValueError, match="--host 999.1.1.1"):
        check_listen("999.1.1.1", 8000)
    check_listen("127.0.0.1", 0)
