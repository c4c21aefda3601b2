"""The main job's scaling ladder: Cerebras-GPT's recipe at CPU size, offline, on this machine.

    python -m cgpt_jax.sweep --config=experiments/cpu_ladder.py --workdir=runs/cpu_ladder
    python -m cgpt_jax.analyze runs/cpu_ladder --reference=cerebras

Recipe, as Cerebras-GPT: 20 tokens per *total* parameter (the paper's rule, so the FLOP axis means
what it means there), AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1, clip 1.0, linear decay to 10% of
the peak. Warmup: 10% of the steps (Cerebras used a fixed 375M tokens, which is 3-17% of its runs).
Corpus: the interpreter's standard library with a 512-entry byte-level BPE, because at this size a
50k vocabulary would put almost every parameter in the embedding.
`--config=experiments/cpu_ladder.py:size=d48l2` trains one rung.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax.config import base_config, parse_arg
from cgpt_jax.errors import InputError
from cgpt_jax.model import params_count

VOCAB = 512
SEQ_LEN = 128
BATCH = 32
WARMUP_FRACTION = 0.1
# name: (d_model, n_layers, n_heads); d_ff = 4 d_model. Width grows at a fixed depth of 2 (a ladder that
# also changed depth, d64l2 → d64l3, fell off the trend by 3%), from 17k to 207k parameters, about 1.5-2x
# per rung. The whole ladder trains in about 3 minutes on 2 cores; the cost grows with N², so the
# largest rung takes about 40% of it.
SIZES = {
    "d16l2": (16, 2, 2),
    "d24l2": (24, 2, 3),
    "d32l2": (32, 2, 2),
    "d48l2": (48, 2, 3),
    "d64l2": (64, 2, 4),
    "d80l2": (80, 2, 5),
}


def cpu_base_config(size: str) -> ml_collections.ConfigDict:
    """One CPU-sized model on the offline corpus; training length left to the caller."""
    if size not in SIZES:
        raise InputError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    d_model, n_layers, n_heads = SIZES[size]
    config = base_config()
    m, t, data = config.model, config.train, config.data
    data.source, data.tokenizer, data.eval_batches = "stdlib", f"bpe(vocab={VOCAB})", 16
    m.vocab_size = VOCAB  # fixed here (not -1) so that the parameter count, and so the steps, are known now
    m.d_model, m.n_layers, m.n_heads, m.d_ff = d_model, n_layers, n_heads, 4 * d_model
    m.max_seq_len = t.seq_len = SEQ_LEN
    m.scan_layers = False  # 2-4 layers: unrolled is ~30% faster on XLA:CPU and still compiles in seconds
    m.attention = "fused"  # dense attention's result through the C++ CPU kernel: the step is ~20% faster
    t.global_batch_size, t.peak_lr = BATCH, 3e-3
    t.log_every, t.eval_every = 20, 1_000_000  # evaluated once, at the last step
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="d32l2", tokens_per_param=20.0)
    config = cpu_base_config(args.size)
    t = config.train
    t.tokens_per_param = args.tokens_per_param
    t.steps = int(args.tokens_per_param * params_count(config.model) // (BATCH * SEQ_LEN))
    t.warmup_steps = max(1, round(WARMUP_FRACTION * t.steps))
    return config


def sweep(arg: str | None = None) -> list[dict]:
    return [{"name": size, "config_arg": f"size={size}"} for size in SIZES]
