"""The OpenAI-compatible FastAPI app over the batching engine (or a classifier).

    POST /v1/completions   prompt (text or token ids) → completion, whole or streamed (server-sent events)
    POST /v1/classify      texts → labels and probabilities (classifier checkpoints)
    GET  /v1/models        the served model
    GET  /health           liveness, never behind the API key
    GET  /metrics          Prometheus text (cgpt_jax/serve/metrics.py)

Errors have the OpenAI body {"error": {"message", "type", "param", "code"}} (protocol.py): 400 for a bad
field, 401 without the API key, 404 for another model or path, 413 for a body over `max_body_bytes`,
429 when `max_queue` requests already wait for a slot. A completion's choice carries `token_ids` (the
generated ids, an extension as in vLLM) besides `text`. The model's end-of-text token ends a completion
(finish_reason "stop") and is not part of its text; a stop sequence ends it too and is cut from the text.
Text streams in pieces that cannot still turn out to begin a stop sequence or split a character.
A client that disconnects cancels its request, which frees its slot.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import secrets
import time
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from tokenizers import Tokenizer

from cgpt_jax.finetune.predict import Classifier
from cgpt_jax.serve import engine as engines
from cgpt_jax.serve.metrics import CONTENT_TYPE, Metrics
from cgpt_jax.serve.protocol import APIError, Completion, parse_classify, parse_completion

_DISCONNECT_POLL_S = 0.5
_CLASSIFY_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Settings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_queue: int = 256


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    engine: engines.Engine
    tokenizer: Tokenizer | None
    eos_ids: tuple[int, ...]
    vocab_size: int


class _Text:
    """A completion's text as tokens arrive: decoded as a whole (multi-byte characters span tokens), cut at
    the first stop sequence; `ready` is the part no later token can change."""

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        if self.tokenizer is None:
            self.text += f" {token}"  # as `python -m cgpt_jax.generate` prints ids
            return
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        found = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else f" {token}"

    def ready(self, finished: bool) -> str:
        if finished or self.stopped:
            return self.text
        text = self.text.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return text[:len(text) - hold] if hold else text


class _Job:
    """One completion on the engine: events come from the engine thread into an asyncio queue."""

    def __init__(self, completion: Completion, model: LanguageModel, loop: asyncio.AbstractEventLoop):
        self.completion, self.loop = completion, loop
        self.events: asyncio.Queue = asyncio.Queue()
        seed = completion.seed if completion.seed is not None else secrets.randbelow(2**31)
        self.request = engines.Request(completion.prompt, completion.max_tokens, self._emit, completion.temperature,
                                       completion.top_k, completion.top_p, seed, frozenset(model.eos_ids))
        self.text = _Text(model.tokenizer, completion.stop)
        self.eos_ids = model.eos_ids
        self.arrived = time.monotonic()
        self.logprobs: list[float] = []
        self.tokens: list[int] = []
        self.received = 0  # tokens the engine generated for it so far (end-of-text included)
        self.finish_reason: str | None = None

    def _emit(self, token: int, logprob: float, reason: str | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (token, logprob, reason, time.monotonic()))

    def take(self, token: int, logprob: float, reason: str | None) -> None:
        """Record one event; sets finish_reason when the completion is over."""
        if reason == engines.ERROR:
            raise APIError(500, "the model failed while generating; see the server's log", code="engine_failed")
        self.received += 1
        if token not in self.eos_ids:
            self.tokens.append(token)
            self.logprobs.append(logprob)
            self.text.add(token)
        self.finish_reason = engines.STOP if self.text.stopped else reason

    def logprobs_body(self, start: int) -> dict[str, Any] | None:
        if not self.completion.logprobs:
            return None
        return {"tokens": [self.text.piece(t) for t in self.tokens[start:]], "token_logprobs": self.logprobs[start:],
                "top_logprobs": None, "text_offset": None}


def _usage(job: _Job) -> dict[str, int]:
    prompt, generated = len(job.completion.prompt), job.received
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def create_app(served: LanguageModel | Classifier, settings: Settings) -> FastAPI:
    engine = served.engine if isinstance(served, LanguageModel) else None
    metrics = Metrics(lambda: engine.queue_depth if engine else 0, lambda: engine.busy_slots if engine else 0)
    classify_lock = asyncio.Lock()
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.start()
        yield
        if engine is not None:
            engine.stop()

    app = FastAPI(title="cgpt_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=settings.api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> JSONResponse:
        error = APIError(404, f"no endpoint {request.method} {request.url.path}")
        return JSONResponse(error.body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, _: Exception) -> JSONResponse:
        error = APIError(405, f"{request.url.path} does not take {request.method}")
        return JSONResponse(error.body(), status_code=405)

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        too_large = APIError(413, f"the request body is over {limit} bytes — send a shorter prompt")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine is not None and engine.failure is not None:
            return JSONResponse({"status": "failed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": started,
                                            "owned_by": "cgpt_jax"}]}

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        if not isinstance(served, Classifier):
            raise APIError(404, f"'{settings.model_name}' is a language model; it has no /v1/classify — use "
                                f"/v1/completions", code="not_a_classifier")
        texts = parse_classify(await read_body(request), model_name=settings.model_name)
        async with classify_lock:  # one batch at a time: concurrent requests wait here, not for the cores
            try:
                probs_NxC, _ = await asyncio.to_thread(served.predict, texts, _CLASSIFY_BATCH)
            except ValueError as e:
                raise APIError(400, str(e), "input") from None
        data = [{"index": i, "label": served.label_names[int(np.argmax(p))],
                 "probabilities": {name: float(q) for name, q in zip(served.label_names, p)}}
                for i, p in enumerate(probs_NxC)]
        return {"object": "list", "model": settings.model_name, "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        if not isinstance(served, LanguageModel):
            raise APIError(404, f"'{settings.model_name}' is a classifier; use /v1/classify",
                           code="not_a_language_model")
        completion = parse_completion(await read_body(request), model_name=settings.model_name,
                                      vocab_size=served.vocab_size, cache_len=served.engine.cache_len,
                                      tokenizer=served.tokenizer)
        if served.engine.queue_depth >= settings.max_queue:
            raise APIError(429, f"{settings.max_queue} requests are already waiting — retry later",
                           code="queue_full")
        job = _Job(completion, served, asyncio.get_running_loop())
        try:
            served.engine.submit(job.request)
        except RuntimeError:
            raise APIError(503, "the server is shutting down") from None
        metrics.prompt_tokens.inc(len(completion.prompt))
        header = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                  "model": settings.model_name}
        if completion.stream:
            return StreamingResponse(_stream(job, header), media_type="text/event-stream")
        return JSONResponse(await _whole(job, header, request))

    async def next_event(job: _Job, last: float) -> float:
        token, logprob, reason, at = await job.events.get()
        job.take(token, logprob, reason)
        if job.received == 1:
            metrics.time_to_first_token.observe(at - job.arrived)
        else:
            metrics.time_per_output_token.observe(at - last)
        metrics.completion_tokens.inc()
        if job.finish_reason is not None:
            if job.finish_reason == engines.STOP and reason is None:
                served.engine.cancel(job.request)  # a stop sequence: the engine does not know about it
            metrics.latency.observe(at - job.arrived)
        return at

    async def _whole(job: _Job, header: dict[str, Any], request: Request) -> dict[str, Any]:
        last = job.arrived
        try:
            while job.finish_reason is None:
                try:
                    last = await asyncio.wait_for(next_event(job, last), _DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        served.engine.cancel(job.request)
                        return {}
        except asyncio.CancelledError:
            served.engine.cancel(job.request)
            raise
        choice = {"index": 0, "text": job.text.text, "logprobs": job.logprobs_body(0),
                  "finish_reason": job.finish_reason, "token_ids": job.tokens}
        return {**header, "choices": [choice], "usage": _usage(job)}

    async def _stream(job: _Job, header: dict[str, Any]) -> AsyncIterator[str]:
        sent_text, sent_tokens, last = 0, 0, job.arrived
        try:
            while job.finish_reason is None:
                last = await next_event(job, last)
                while job.finish_reason is None and not job.events.empty():  # one chunk for what has arrived
                    last = await next_event(job, last)
                ready = job.text.ready(job.finish_reason is not None)
                if len(ready) == sent_text and len(job.tokens) == sent_tokens and job.finish_reason is None:
                    continue
                choice = {"index": 0, "text": ready[sent_text:], "logprobs": job.logprobs_body(sent_tokens),
                          "finish_reason": job.finish_reason, "token_ids": job.tokens[sent_tokens:]}
                sent_text, sent_tokens = len(ready), len(job.tokens)
                yield _event({**header, "choices": [choice]})
            if job.completion.include_usage:
                yield _event({**header, "choices": [], "usage": _usage(job)})
            yield "data: [DONE]\n\n"
        except APIError as error:  # the response has started: an error event ends the stream
            yield _event(error.body())
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: free the slot
            if job.finish_reason is None:
                served.engine.cancel(job.request)

    return app


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


_ENDPOINTS = {"/v1/completions", "/v1/classify", "/v1/models", "/health", "/metrics"}


class _Guard:
    """ASGI middleware: the bearer key on every path but /health (compared in constant time), and the
    request count by endpoint and status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if self.expected is not None and path != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or wrong API key — send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return await JSONResponse(error.body(), status_code=401)(scope, receive, counted_send)
        await self.app(scope, receive, counted_send)
