"""The OpenAI-compatible server on a tiny model: endpoints, SSE framing, continuous batching equals the
offline generator, nothing compiles after warm-up, bad requests, auth and limits, disconnects, the real
`openai` client, and drain on SIGTERM."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn, prometheus_client, openai, httpx) "
                               "is not installed")
pytest.importorskip("prometheus_client", reason="the [serve] extra is not installed")
httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")

from cgpt_jax import generate  # noqa: E402
from cgpt_jax.errors import InputError  # noqa: E402
from cgpt_jax.infer import Sampling  # noqa: E402
from cgpt_jax.interop import hf  # noqa: E402
from cgpt_jax.model import GPT  # noqa: E402
from cgpt_jax.serve.__main__ import build, check_security  # noqa: E402
from cgpt_jax.serve.app import Settings, create_app  # noqa: E402
from tests.helpers import byte_bpe_tokenizer, tiny_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_LEN = 32  # prompt buckets 16 and 32: two prefill programs
SLOTS = 4
NAME = "tiny"


def random_weights(make):
    """`make()`'s module with N(0, 0.02) weights (LayerNorm gains around 1) drawn on the host: an eager
    init compiles each of its operations, seconds for even a tiny model."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    rng = np.random.RandomState(7)

    def draw(path, x):
        gain = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jax.device_put(np.asarray(rng.normal(gain, 0.02, x.shape), x.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = tiny_config().model
    cfg.max_seq_len = 64
    tokenizer = byte_bpe_tokenizer(64, "the cat sat on the mat; the dog ate the hat", repeats=10)
    directory = tmp_path_factory.mktemp("tiny_hf")
    hf.save_pretrained(random_weights(lambda: GPT(cfg, rngs=nnx.Rngs(7))), directory, tokenizer=tokenizer,
                       eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    return directory


class _Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, application):
        self.server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def served(hf_dir):
    return build(f"hf:{hf_dir}", max_batch=SLOTS, cache_len=CACHE_LEN, tensor_parallel=1)


@pytest.fixture(scope="module")
def server(served):
    running = _Server(create_app(served, Settings(NAME)))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def compiled_programs(served) -> tuple[int, ...]:
    engine = served.engine
    return engine._step._cache_size(), engine._insert._cache_size(), engine.generator.prefill._cache_size()


def test_concurrent_requests_equal_the_offline_generator_and_compile_nothing(served, server, caplog):
    """8 requests of mixed lengths on 4 slots at once, greedy and sampled: each equals `Generator.generate`
    of its prompt (rows of one offline batch equal each prompt alone), and nothing compiles after warm-up."""
    rng = np.random.RandomState(0)
    lengths = {Sampling(): [3, 9, 14, 20], Sampling(temperature=0.8, top_k=10, top_p=0.9): [2, 7, 12, 18]}
    seed, longest_new = 5, CACHE_LEN - 20
    bodies, groups = [], []
    for sampling, group in lengths.items():
        prompts = [rng.randint(0, 64, n).tolist() for n in group]
        groups.append((sampling, prompts))
        for b, prompt in enumerate(prompts):  # offline row b samples with seed + b
            bodies.append({"prompt": prompt, "max_tokens": int(rng.randint(1, longest_new + 1)), "seed": seed + b,
                           "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p})
    before = compiled_programs(served)

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        responses = asyncio.run(send_all())
    assert [r for r in caplog.records if "Finished XLA compilation" in r.getMessage()] == []
    assert compiled_programs(served) == before
    eos = served.eos_ids
    expected = [row for sampling, prompts in groups
                for row in served.engine.generator.generate(prompts, max_new_tokens=longest_new, sampling=sampling,
                                                            seed=seed, stop_tokens=eos)]
    for body, response, offline in zip(bodies, responses, expected):
        offline = offline[:body["max_tokens"]]
        choice = response.json()["choices"][0]
        assert choice["token_ids"] == [t for t in offline if t not in eos]
        assert choice["finish_reason"] == ("stop" if offline[-1] in eos else "length")
        assert response.json()["usage"]["completion_tokens"] == len(offline)


def test_greedy_text_equals_the_generate_command(hf_dir, client):
    out = io.StringIO()
    loaded, mesh = generate.load(str(hf_dir))
    generate.run(loaded, mesh, prompt="the cat", prompt_ids=None, max_new_tokens=20, sampling=Sampling(),
                 seed=0, stop_ids=None, truncate_prompt=False, out=out)
    reply = client.post("/v1/completions", json={"model": NAME, "prompt": "the cat", "max_tokens": 20,
                                                 "temperature": 0}).json()
    assert out.getvalue() == "the cat" + reply["choices"][0]["text"] + "\n"


def test_sse_framing_and_usage(client):
    body = {"prompt": "the dog", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    whole = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    choice = whole["choices"][0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == choice["token_ids"]
    streamed_logprobs = sum((c["choices"][0]["logprobs"]["token_logprobs"] for c in chunks), [])
    np.testing.assert_allclose(streamed_logprobs, choice["logprobs"]["token_logprobs"], rtol=1e-6)
    assert all(lp <= 0 for lp in streamed_logprobs) and len(streamed_logprobs) == len(choice["token_ids"])
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == choice["finish_reason"]


def test_models_health_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [NAME]
    client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0})
    text = client.get("/metrics").text
    for line in ('cgpt_jax_requests_total{endpoint="/v1/completions",status="200"}',
                 "cgpt_jax_prompt_tokens_total", "cgpt_jax_completion_tokens_total", "cgpt_jax_queue_depth 0.0",
                 "cgpt_jax_time_to_first_token_seconds_bucket", "cgpt_jax_time_per_output_token_seconds_count"):
        assert line in text
    assert float(re.search(r"^cgpt_jax_completion_tokens_total (\S+)$", text, re.M).group(1)) >= 3


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "a", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"prompt": "a", "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": True}, 400, "temperature"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 64]}, 400, "prompt"),
    ({"prompt": [1] * CACHE_LEN}, 400, "prompt"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": CACHE_LEN - 1}, 400, "max_tokens"),
    ({"prompt": [1, 2], "top_p": 0}, 400, "top_p"),
    ({"prompt": [1, 2], "stop": ["a"] * 5}, 400, "stop"),
    ({"prompt": [1, 2], "n": 2}, 400, "n"),
    ({"prompt": [1, 2], "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_are_refused_naming_the_field(client, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post("/v1/completions", **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert client.post("/v1/completions", json={"prompt": [1], "max_tokens": 1}).status_code == 200  # still serving


def test_api_key_body_size_and_queue_limits(served):
    """401 without the key (not on /health), 413 over the size limit, 429 over the queue limit."""
    application = create_app(served, Settings(NAME, api_key="sesame", max_body_bytes=100, max_queue=0))
    transport = httpx.ASGITransport(app=application)

    async def check():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            assert (await c.get("/health")).status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                response = await c.get("/v1/models", headers=headers)
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            auth = {"Authorization": "Bearer sesame"}
            assert (await c.get("/v1/models", headers=auth)).status_code == 200
            too_big = await c.post("/v1/completions", headers=auth, json={"prompt": "the " * 50})
            assert too_big.status_code == 413
            full = await c.post("/v1/completions", headers=auth, json={"prompt": [1, 2]})
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert (await c.post("/v1/classify", headers=auth, json={"input": "x"})).status_code == 404
            return (await c.get("/metrics", headers=auth)).text

    metrics = asyncio.run(check())
    assert 'cgpt_jax_requests_total{endpoint="/v1/models",status="401"} 3.0' in metrics
    assert 'cgpt_jax_requests_total{endpoint="/v1/completions",status="429"} 1.0' in metrics


def test_refuses_a_public_address_without_a_key():
    with pytest.raises(InputError, match="--api_key"):
        check_security("0.0.0.0", None, insecure=False)
    check_security("0.0.0.0", "key", insecure=False)
    check_security("0.0.0.0", None, insecure=True)
    check_security("::1", None, insecure=False)


def test_a_client_that_disconnects_frees_its_slot(served, server):
    engine = served.engine
    steps = engine.steps
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": [1, 2], "max_tokens": CACHE_LEN - 2,
                                                       "temperature": 0, "stream": True}) as response:
            next(response.iter_lines())
    deadline = time.monotonic() + 10
    while engine.busy_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.busy_slots == 0 and engine.steps - steps < CACHE_LEN - 3


def test_the_openai_client(served, server):
    openai = pytest.importorskip("openai", reason="the [serve] extra is not installed")
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    whole = api.completions.create(model=NAME, prompt="the cat", max_tokens=16, temperature=0)
    text = whole.choices[0].text
    assert whole.usage.prompt_tokens == len(served.tokenizer.encode("the cat").ids)
    streamed = api.completions.create(model=NAME, prompt="the cat", max_tokens=16, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text
    assert len(text) >= 3
    stop = text[1:3]
    stopped = api.completions.create(model=NAME, prompt="the cat", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="the cat", max_tokens=2)


def test_classify(tmp_path):
    from cgpt_jax.finetune.model import SequenceClassifier

    cfg = tiny_config().model
    tokenizer = byte_bpe_tokenizer(64, "the cat sat on the mat; the dog ate the hat", repeats=10)
    eos = tokenizer.token_to_id("<|endoftext|>")
    classifier = random_weights(lambda: SequenceClassifier(cfg, 2, rngs=nnx.Rngs(3)))
    hf.save_classifier(classifier, tmp_path, label_names=["cat", "dog"], pad_token_id=eos, tokenizer=tokenizer,
                       eos_token_id=eos)
    served = build(f"hf:{tmp_path}", max_batch=SLOTS, cache_len=None, tensor_parallel=1)
    expected, _ = served.predict(["the cat", "the dog ate"], batch_size=8)
    transport = httpx.ASGITransport(app=create_app(served, Settings("clf")))

    async def ask():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.post("/v1/classify", json={"input": ["the cat", "the dog ate"]}),
                    await c.post("/v1/classify", json={"input": []}),
                    await c.post("/v1/completions", json={"prompt": "the"}))

    ok, empty, completion = asyncio.run(ask())
    data = ok.json()["data"]
    np.testing.assert_allclose([[d["probabilities"]["cat"], d["probabilities"]["dog"]] for d in data], expected,
                               rtol=1e-6)
    assert [d["label"] for d in data] == [["cat", "dog"][int(i)] for i in np.argmax(expected, axis=1)]
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"
    assert completion.status_code == 404


def test_sigterm_drains_in_flight_requests_and_exits_0(hf_dir, served):
    """The command on 2 devices (tensor parallel; the tests' 8 fake CPU devices): a stream in flight when
    SIGTERM arrives finishes with the single-device generator's tokens, then the process exits 0."""
    command = [sys.executable, "-m", "cgpt_jax.serve", f"--checkpoint=hf:{hf_dir}", "--port=0", "--max_batch=2",
               "--cache_len=16", "--tensor_parallel=2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    prompt, new = [1, 2], 14
    try:
        url = re.search(r"on (http://\S+)", process.stdout.readline()).group(1)
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": new, "temperature": 0,
                                                           "stream": True}) as response:
                lines = response.iter_lines()
                first = next(lines)
                process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        assert process.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        process.kill()
        process.wait()
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
    streamed = sum((chunk["choices"][0]["token_ids"] for chunk in chunks), [])
    expected = served.engine.generator.generate([prompt], max_new_tokens=new, stop_tokens=served.eos_ids)[0]
    assert streamed == [t for t in expected if t not in served.eos_ids]
    assert chunks[-1]["choices"][0]["finish_reason"] == ("stop" if expected[-1] in served.eos_ids else "length")


@pytest.fixture(scope="module")
def quantized(hf_dir):
    pytest.importorskip("cgpt_jax.quantize", reason="quantization (cgpt_jax/quantize) is not there")
    served = build(f"hf:{hf_dir}", max_batch=2, cache_len=16, tensor_parallel=1, scheme="int8")
    served.engine.start()
    yield served
    served.engine.stop()


def _complete(engine, prompt: list[int], new: int) -> list[tuple]:
    from cgpt_jax.serve.engine import Request

    events, done = [], threading.Event()
    engine.submit(Request(prompt, new, lambda *event: (events.append(event), event[2] and done.set())))
    assert done.wait(60)
    return events


def test_quantized_serving_equals_the_quantized_generator(quantized):
    """--quantize=int8: the engine decodes the quantized model token for token as the offline generator."""
    from cgpt_jax.quantize import weight_bytes

    generator = quantized.engine.generator
    assert weight_bytes(generator.state)["quantized"] > 0
    prompt, new = [5, 9, 33, 2], 10
    tokens = [token for token, _, _ in _complete(quantized.engine, prompt, new)]
    assert tokens == generator.generate([prompt], max_new_tokens=new)[0]


def test_a_failed_engine_fails_its_requests_and_health(quantized):
    engine = quantized.engine

    def fail(*args):
        raise RuntimeError("a failing program")

    engine._step = fail
    events = _complete(engine, [1, 2], 4)  # the first token comes from the prefill, then the step fails
    assert len(events) == 2 and events[0][2] is None and events[1] == (-1, 0.0, "error")
    assert isinstance(engine.failure, RuntimeError)
    transport = httpx.ASGITransport(app=create_app(quantized, Settings(NAME)))

    async def ask():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.get("/health"),
                    await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4}))

    health, completion = asyncio.run(ask())
    assert health.status_code == 503 and completion.status_code == 503
