"""The OpenAI request bodies the server reads, checked field by field, and the OpenAI-style error body.

`parse_completion` turns a POST /v1/completions body into a `Completion` or raises `APIError` naming the
field (`param`) and what to send instead; `parse_classify` does the same for POST /v1/classify. Nothing a
request carries is used as a path: the only strings read are the prompt, the stop sequences and the model
name, which is compared with the served one.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for completions
MAX_STOP_SEQUENCES = 4  # as the OpenAI API


class APIError(Exception):
    """An HTTP error with the OpenAI error body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Completion:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage counts
    logprobs: bool


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _load(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}) — send a JSON object") from None
    if not isinstance(parsed, dict):
        raise APIError(400, "the request body must be a JSON object with the request's fields")
    return parsed


def _check_fields(fields: dict[str, Any], known: dict[str, str]) -> None:
    """Unknown fields and wrong JSON types (`known`: field → kind among 'int', 'number', 'bool', 'str',
    'any'); null counts as absent."""
    for name, value in fields.items():
        if name not in known:
            raise APIError(400, f"unknown field '{name}' — the fields read here are: {', '.join(sorted(known))}",
                           name, "unknown_field")
        kind = known[name]
        ok = {"int": _is_int, "number": _is_number, "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "any": lambda v: True}[kind](value)
        if value is not None and not ok:
            expected = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string"}[kind]
            raise APIError(400, f"'{name}' is {json.dumps(value)[:40]}; it must be {expected}", name, "invalid_type")


def check_model(fields: dict[str, Any], model_name: str) -> None:
    model = fields.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model '{model}' does not exist — this server serves '{model_name}' "
                            f"(GET /v1/models)", "model", "model_not_found")


_COMPLETION_FIELDS = {"model": "str", "prompt": "any", "max_tokens": "int", "temperature": "number",
                      "top_p": "number", "top_k": "int", "stop": "any", "seed": "int", "stream": "bool",
                      "stream_options": "any", "logprobs": "int", "n": "int", "echo": "bool", "user": "str"}


def parse_completion(body: bytes, *, model_name: str, vocab_size: int, cache_len: int, tokenizer) -> Completion:
    """A checked completion request; `tokenizer` (HF `tokenizers.Tokenizer` or None) encodes a text prompt."""
    fields = _load(body)
    _check_fields(fields, _COMPLETION_FIELDS)
    check_model(fields, model_name)
    get = lambda name, default: default if fields.get(name) is None else fields[name]
    if get("n", 1) != 1:
        raise APIError(400, "n must be 1 — send one request per completion", "n")
    if get("echo", False):
        raise APIError(400, "echo=true is not supported — the prompt is the caller's already", "echo")
    if get("logprobs", 0) not in (0,):
        raise APIError(400, f"logprobs={fields['logprobs']}: only 0 is supported (the chosen tokens' "
                            f"log-probabilities, no alternatives)", "logprobs")

    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer — give the prompt as a list of token ids", "prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt has token ids outside [0, {vocab_size}): {bad[:5]}", "prompt")
    else:
        raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    if not ids:
        raise APIError(400, "prompt is empty — give at least one token to continue from", "prompt")

    max_tokens = get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens={max_tokens} must be at least 1", "max_tokens")
    if len(ids) >= cache_len:
        raise APIError(400, f"prompt has {len(ids)} tokens; the server holds {cache_len} positions per request "
                            f"(prompt + max_tokens) — shorten the prompt", "prompt")
    if len(ids) + max_tokens > cache_len:
        raise APIError(400, f"max_tokens={max_tokens} with a prompt of {len(ids)} tokens needs "
                            f"{len(ids) + max_tokens} positions; the server holds {cache_len} — lower max_tokens "
                            f"to at most {cache_len - len(ids)}", "max_tokens")

    temperature, top_p, top_k = float(get("temperature", 1.0)), float(get("top_p", 1.0)), get("top_k", 0)
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"temperature={temperature} must be in [0, 2] (0: greedy)", "temperature")
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"top_p={top_p} must be in (0, 1] (1: off)", "top_p")
    if not 0 <= top_k <= vocab_size:
        raise APIError(400, f"top_k={top_k} must be in [0, {vocab_size}] (0: off)", "top_k")
    seed = get("seed", None)
    if seed is not None and not 0 <= seed < 2**31:
        raise APIError(400, f"seed={seed} must be in [0, 2^31)", "seed")

    stop = get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them",
                       "stop")
    if stop and tokenizer is None:
        raise APIError(400, "stop sequences need text, and this model has no tokenizer", "stop")
    options = get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options must be an object with at most 'include_usage'", "stream_options")
    return Completion(ids, max_tokens, temperature, top_p, top_k, tuple(stop), seed, get("stream", False),
                      bool(options.get("include_usage", False)), fields.get("logprobs") is not None)


def parse_classify(body: bytes, *, model_name: str) -> list[str]:
    """The texts of a classification request {"input": str | [str, ...], "model"?}."""
    fields = _load(body)
    _check_fields(fields, {"model": "str", "input": "any"})
    check_model(fields, model_name)
    texts = fields.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise APIError(400, "input must be a non-empty string or a non-empty list of them", "input")
    return texts
