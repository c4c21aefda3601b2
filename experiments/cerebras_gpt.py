"""Cerebras-GPT (Dey et al. 2023): the seven published sizes with the published recipe.

    --config=experiments/cerebras_gpt.py:size=111m      (111m 256m 590m 1.3b 2.7b 6.7b 13b, or tiny)
    --config=experiments/cerebras_gpt.py:size=111m,mup=True   (Cerebras-GPT-muP: 111m ... 2.7b, or tiny)

Only the published facts are typed here (shape, batch, peak LR, decay type, Adam eps, and the two
configs whose output-layer init departs from 0.02/sqrt(2L)); everything else is derived:
d_ff = 4·d_model, steps = 20 tokens/param, warmup = 375M tokens, head dim = d_model / heads.
Source: cgpt_jax/reference/cerebras_gpt.json (modelzoo configs at b353ab5; the tests check these values against it).

13B was trained with a batch ramp (720 sequences for 57k steps, then 1080); here it uses batch 720 for
its batch-720-equivalent step count. `sweep()` lists the seven sizes: one scaling curve.

`mup=True` gives Cerebras-GPT-muP: the same shapes, batches, schedules and token budgets, with muP
(cgpt_jax/model/parameterization.py) and the base values Cerebras tuned on its 40M proxy (d_model 256):
init std 0.08 and learning rate 6e-3 (`init_std` and `peak_lr` are base values under muP; the
embedding multiplier 10 and base widths 256/1024 are the config defaults). Every per-size value (hidden
init 0.08/sqrt(m), output-layer init 0.08/sqrt(2·L·m), hidden LR 6e-3/m, logits ×1/m) is derived from
these. The SP-only output-layer init overrides (1.3B, 13B) do not apply. `sweep('mup=True')` lists the
five muP sizes.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax.config import base_config, parse_arg
from cgpt_jax.errors import InputError

GPT2_VOCAB_SIZE = 50257
CONTEXT = 2048

# size: (d_model, n_layers, n_heads, batch_seqs, peak_lr, decay, adam_eps, output_init_std or None)
SIZES = {
    "111m": (768, 10, 12, 120, 6.0e-4, "linear", 1e-8, None),
    "256m": (1088, 14, 17, 264, 6.0e-4, "linear", 1e-8, None),
    "590m": (1536, 18, 12, 264, 2.0e-4, "linear", 1e-8, None),
    "1.3b": (2048, 24, 16, 528, 2.0e-4, "cosine", 1e-8, 0.0025),  # config: 0.0025, not 0.02/sqrt(48)
    "2.7b": (2560, 32, 32, 528, 2.0e-4, "cosine", 1e-8, None),  # 32 heads × 80 (the README's 20 is an erratum)
    "6.7b": (4096, 32, 32, 1040, 1.2e-4, "linear", 1e-9, None),
    "13b": (5120, 40, 40, 720, 1.2e-4, "cosine", 1e-9, 0.0025),  # config: 0.0025, not 0.02/sqrt(80)
}
MUP_SIZES = ("111m", "256m", "590m", "1.3b", "2.7b")
MUP_BASE_INIT_STD = 0.08  # sigma_base, tuned on the proxy
MUP_BASE_LR = 6e-3  # eta_base, tuned on the proxy


def use_mup(config: ml_collections.ConfigDict) -> None:
    """Switch `config` to Cerebras-GPT's muP with its tuned base values (in place)."""
    config.model.parameterization = "mup"
    config.model.init_std = MUP_BASE_INIT_STD
    config.model.output_init_std = -1.0  # derived: init_std / sqrt(2 · n_layers), then / sqrt(m) per layer
    config.train.peak_lr = MUP_BASE_LR


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="111m", mup=False)
    if args.mup and args.size not in (*MUP_SIZES, "tiny"):
        raise InputError(f"size={args.size} with mup=True: Cerebras released muP models only for "
                         f"{list(MUP_SIZES)} (or use 'tiny'); drop mup=True for the SP {args.size}")
    config = base_config()
    m, t = config.model, config.train
    if args.size == "tiny":
        # A smoke test: a few hundred steps in well under a minute on a 2-core CPU.
        m.d_model, m.n_layers, m.n_heads, m.d_ff = 64, 2, 4, 256
        m.max_seq_len = t.seq_len = 128
        t.global_batch_size, t.steps, t.warmup_steps, t.peak_lr = 16, 300, 30, 3e-3
        t.log_every, t.eval_every = 10, 100
        config.checkpoint.every_steps = 100  # saves at 100, 200 and the last step
        if args.mup:
            use_mup(config)
        return config
    if args.size not in SIZES:
        raise InputError(f"unknown size {args.size!r}; choose one of {sorted(SIZES)} or 'tiny'")
    d_model, n_layers, n_heads, batch, peak_lr, decay, eps, output_std = SIZES[args.size]
    m.vocab_size = GPT2_VOCAB_SIZE
    m.d_model, m.n_layers, m.n_heads, m.d_ff = d_model, n_layers, n_heads, 4 * d_model
    m.max_seq_len = t.seq_len = CONTEXT
    if output_std is not None:
        m.output_init_std = output_std
    t.global_batch_size, t.peak_lr, t.decay, t.adam_eps = batch, peak_lr, decay, eps
    if args.mup:
        use_mup(config)
    return config


def sweep(arg: str | None = None) -> list[dict]:
    """The published ladder: one run per size (the five muP sizes with 'mup=True'; `size` is ignored)."""
    args = parse_arg(arg, size="111m", mup=False)
    if args.mup:
        return [{"name": f"{size}-mup", "config_arg": f"size={size},mup=True"} for size in MUP_SIZES]
    return [{"name": size, "config_arg": f"size={size}"} for size in SIZES]
