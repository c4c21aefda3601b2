"""Serving: an OpenAI-compatible HTTP server (`python -m cgpt_jax.serve`) over a continuous-batching engine.

Reading order: `engine.py` (decode slots over the KV-cache Generator: admit, decode, deliver; each
slot samples with its own settings, `cgpt_jax.infer.sampling.choose_rows`), `protocol.py` (request fields
and error bodies), `app.py` (the FastAPI endpoints), `metrics.py` (Prometheus), `__main__.py` (the
command: load, warm up, bind, drain on SIGTERM) and `loadtest.py` (the loopback load test of
docs/serving.md).
"""
