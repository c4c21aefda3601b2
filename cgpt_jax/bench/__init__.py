"""Train-step benchmarks: `python -m cgpt_jax.bench` (cgpt_jax/bench/__main__.py).

    runners.py     the timed cgpt_jax step, and the loop that alternates frameworks round by round
    torch_gpt.py   the PyTorch eager reference: the same architecture and training step (optional extra)
    report.py      JSON lines of results → the markdown table of docs/performance.md
"""
