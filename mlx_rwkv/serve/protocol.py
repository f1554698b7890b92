"""OpenAI request bodies -> engine `Request`s, and the response/chunk/error JSON shapes.

Every check raises `APIError` with OpenAI's error shape and status: 400 for a body that is not
JSON, a missing or wrong-typed field, a value out of range, an unsupported feature or a prompt
over the limit (code `context_length_exceeded`); 404 for an unknown model (`model_not_found`).
Ranges are OpenAI's (temperature [0, 2], top_p [0, 1], penalties [-2, 2], at most 4 stop
strings); extensions: top_k >= 0, min_p [0, 1), penalty_decay (0, 1], ignore_eos (vLLM's: do
not stop at the end-of-text token, as benchmarks that need a fixed length ask).
"""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .chat_format import CHAT_STOPS, encode_chat
from .engine import Done, Request
from .row_sampler import RowParams

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # OpenAI's legacy completions default; chat: ours
MAX_STOPS = 4
UNSUPPORTED = {"logprobs": "logprobs", "top_logprobs": "logprobs", "echo": "echo", "suffix": "suffix",
               "tools": "tools", "functions": "function calling", "logit_bias": "logit_bias"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """A validated request: what the engine runs and how to answer."""

    kind: str  # "completion" or "chat"
    request: Request
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def parse(kind: str, body: dict, tokenizer, model_id: str, vocab_size: int, max_prompt_tokens: int | None) -> Parsed:
    """Validate an OpenAI completions/chat body (see the module docstring for the rules)."""
    model = _field(body, "model", str, required=True)
    if model != model_id:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_id!r}", "model",
                       "model_not_found")
    for name, feature in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}, 0):
            raise APIError(400, f"{feature} is not supported by this server", name, "unsupported_parameter")
    for name in ("n", "best_of"):
        if _field(body, name, int, 1) != 1:
            raise APIError(400, f"{name} must be 1 (one choice per request)", name)
    if kind == "chat":
        prompt, cuts = encode_chat(tokenizer, _messages(body))
        stops: tuple[str, ...] = CHAT_STOPS
    else:
        prompt, cuts, stops = _prompt(body, tokenizer, vocab_size), [], ()
    if not prompt:
        raise APIError(400, "the prompt is empty: give at least one token", "prompt" if kind == "completion" else "messages")
    if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this server takes at most {max_prompt_tokens} "
                       "(--max-prompt-tokens)", "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    max_tokens = _field(body, "max_tokens", int)
    if max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", int, DEFAULT_MAX_TOKENS[kind])
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    seed = _field(body, "seed", int)
    if seed is not None and not -2**63 <= seed < 2**64:
        raise APIError(400, "seed must fit in 64 bits", "seed")
    params = RowParams(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_k=_field(body, "top_k", int, 0),
        top_p=_number(body, "top_p", 1.0, 0, 1),
        min_p=_number(body, "min_p", 0.0, 0, 1, high_open=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        penalty_decay=_number(body, "penalty_decay", 0.996, 0, 1, low_open=True),
        seed=secrets.randbits(64) if seed is None else seed % 2**64,
    )
    if params.top_k < 0:
        raise APIError(400, f"top_k must be >= 0, got {params.top_k}", "top_k")
    stop = body.get("stop")
    user_stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(user_stops, list) or not all(isinstance(s, str) and s for s in user_stops):
        raise APIError(400, "stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(user_stops) > MAX_STOPS:
        raise APIError(400, f"at most {MAX_STOPS} stop strings, got {len(user_stops)}", "stop")
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {}) or {}
    include_usage = bool(options.get("include_usage", False))
    eos = None if _field(body, "ignore_eos", bool, False) else getattr(tokenizer, "eos_id", None)
    request = Request(tuple(prompt), params, max_tokens, tuple(dict.fromkeys([*user_stops, *stops])),
                      frozenset() if eos is None else frozenset([eos]), tuple(cuts))
    return Parsed(kind, request, stream, include_usage)


def _field(body: dict, name: str, typ: type, default: Any = None, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(400, f"the field {name!r} is required", name, "missing_required_parameter")
        return default
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        want = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list"}[typ]
        raise APIError(400, f"{name} must be {want}, got {json.dumps(value)[:60]}", name, "invalid_type")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False, high_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"{name} must be a number, got {json.dumps(value)[:60]}", name, "invalid_type")
    if not math.isfinite(value):  # Python's json reads NaN and Infinity
        raise APIError(400, f"{name} must be a finite number, got {value}", name)
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise APIError(400, f"{name} must be in {span}, got {value}", name)
    return float(value)


def _prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """`prompt`: a string, a list of token ids, or a one-element list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
        return list(prompt)
    if prompt is None:
        raise APIError(400, "the field 'prompt' is required", "prompt", "missing_required_parameter")
    raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt",
                   "invalid_type")


def _messages(body: dict) -> list[tuple[str, str]]:
    messages = _field(body, "messages", list, required=True)
    if not messages:
        raise APIError(400, "messages must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"{where} must be an object with a string 'role'", where, "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", f"{where}.content", "invalid_type")
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where}.role {m['role']!r} is not supported (system, developer, user, assistant)",
                           f"{where}.role")
        out.append((m["role"], content))
    return out


# ---- responses -----------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def response(kind: str, rid: str, model_id: str, text: str, done: Done) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": done.finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice], "usage": usage(done)}


def chunk(kind: str, rid: str, model_id: str, text: str | None, finish_reason: str | None = None,
          role: bool = False) -> dict:
    """One streamed event; `text` None with `finish_reason` closes the choice."""
    if kind == "chat":
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model_id: str, done: Done) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [], "usage": usage(done)}
