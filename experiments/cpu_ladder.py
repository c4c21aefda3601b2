"""The main job's scaling ladder: Cerebras-GPT's recipe at CPU size, offline, on this machine.

    python -m cgpt_jax.sweep --config=experiments/cpu_ladder.py --workdir=runs/cpu_ladder
    python -m cgpt_jax.analyze runs/cpu_ladder --reference=cerebras

Recipe, as Cerebras-GPT: 20 tokens per *total* parameter (the paper's rule, so the FLOP axis means
what it means there), AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1, clip 1.0, linear decay to 10% of
the peak. Warmup: 10% of the steps (Cerebras used a fixed 375M tokens, which is 3-17% of its runs).
The batch grows with the run, as Cerebras-GPT's did (120 to 720 sequences): every run takes about
TARGET_STEPS steps, because at a fixed batch of 32 the smallest rungs stop after ~80 updates, far from
the loss their tokens can buy, which bends the curve off its law (docs/scaling.md).
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
MAX_BATCH, MIN_BATCH = 64, 2  # sequences per step
TARGET_STEPS = 1000
EVAL_SEQUENCES = 512  # about the same validation windows for every batch size
WARMUP_FRACTION = 0.1
# name: (d_model, n_layers, n_heads); d_ff = 4 d_model. Width grows at a fixed depth of 2 (a ladder that
# also changed depth, d64l2 → d64l3, fell off the trend), 1.3-2x in parameters per size.
SIZES = {
    "d12l2": (12, 2, 2),
    "d16l2": (16, 2, 2),
    "d24l2": (24, 2, 3),
    "d32l2": (32, 2, 2),
    "d40l2": (40, 2, 4),
    "d48l2": (48, 2, 3),
    "d64l2": (64, 2, 4),
    "d80l2": (80, 2, 5),
    "d96l2": (96, 2, 6),
}
# The main job's rungs, 11k to 207k parameters (d96l2 is for the isoFLOP sweep: it would add ~40% to the
# main job's time).
LADDER = ("d12l2", "d16l2", "d24l2", "d32l2", "d40l2", "d48l2", "d64l2", "d80l2")


def batch_size(tokens: float) -> int:
    """Sequences per step that make a run of `tokens` take about TARGET_STEPS steps."""
    return min(MAX_BATCH, max(MIN_BATCH, round(tokens / (SEQ_LEN * TARGET_STEPS))))


def set_shape(config: ml_collections.ConfigDict, size: str) -> None:
    if size not in SIZES:
        raise InputError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    d_model, n_layers, n_heads = SIZES[size]
    m = config.model
    m.d_model, m.n_layers, m.n_heads, m.d_ff = d_model, n_layers, n_heads, 4 * d_model


def set_budget(config: ml_collections.ConfigDict, tokens: float) -> None:
    """Steps, batch, warmup and validation batches of a run that trains on `tokens` tokens."""
    t = config.train
    t.global_batch_size = batch_size(tokens)
    t.steps = int(tokens // (t.global_batch_size * SEQ_LEN))
    t.warmup_steps = max(1, round(WARMUP_FRACTION * t.steps))
    config.data.eval_batches = EVAL_SEQUENCES // t.global_batch_size


def cpu_base_config(size: str) -> ml_collections.ConfigDict:
    """One CPU-sized model on the offline corpus; training length left to the caller (set_budget)."""
    config = base_config()
    set_shape(config, size)
    m, t, data = config.model, config.train, config.data
    data.source, data.tokenizer = "stdlib", f"bpe(vocab={VOCAB})"
    m.vocab_size = VOCAB  # fixed here (not -1) so that the parameter count, and so the steps, are known now
    m.max_seq_len = t.seq_len = SEQ_LEN
    m.scan_layers = False  # 2-4 layers: unrolled is ~30% faster on XLA:CPU and still compiles in seconds
    m.attention = "fused"  # dense attention's result through the C++ CPU kernel: the step is ~20% faster
    t.global_batch_size, t.peak_lr = 32, 3e-3  # the batch until set_budget sizes it (the benchmark's)
    data.eval_batches = EVAL_SEQUENCES // t.global_batch_size
    t.log_every, t.eval_every = 20, 1_000_000  # evaluated once, at the last step
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="d32l2", tokens_per_param=20.0)
    config = cpu_base_config(args.size)
    config.train.tokens_per_param = args.tokens_per_param
    set_budget(config, args.tokens_per_param * params_count(config.model))
    return config


def sweep(arg: str | None = None) -> list[dict]:
    return [{"name": size, "config_arg": f"size={size}"} for size in LADDER]
