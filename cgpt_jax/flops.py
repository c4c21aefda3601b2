"""The one FLOP count. MFU, scaling fits, the benchmark and the planner all call `flops_per_token`.

Conventions (per training token, forward + backward):

* ``cerebras``: what the Cerebras-GPT paper plots and tabulates ("algorithmic FLOPs"):
      6·L·(P + 2·d·d_ff) + 6·L·A + 10·V·d
  with P the attention projection weights per layer (4d² for dense; fewer K/V weights for GQA/MQA),
  A the attention-mixing forward FLOPs per token and layer (dense: 4·S·d, i.e. QKᵀ and AV over
  the full S×S square, no causal saving) and 10·V·d = 6·V·d for the LM head plus 4·V·d for the
  embedding (forward and weight gradient, no input gradient). This reproduces all seven published
  totals to 2 significant figures (tests/test_flops.py). It was derived by fitting, not quoted.
* ``palm``: the usual MFU count (PaLM, App. B; nanoGPT, MaxText): 6·N_matmul + 3·L·A, with N_matmul
  the weights used in matrix multiplies (blocks plus the tied LM head, no embedding lookup) and the
  attention mixing at 3× its forward FLOPs. MFU in this project uses this convention.
* ``6n``: 6 × total parameters (Kaplan et al.; positions and embeddings included).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

Convention = Literal["cerebras", "palm", "6n"]
CONVENTIONS = ("cerebras", "palm", "6n")


@dataclasses.dataclass(frozen=True)
class Shape:
    """The numbers a FLOP count needs; build with `Shape.from_model_config`."""

    vocab_size: int
    d_model: int
    n_layers: int
    d_ff: int
    seq_len: int
    attention_fwd_flops_per_token: float  # per layer, from the attention variant
    n_params: int  # total, tied LM head counted once
    attention_projection_params: int  # per layer: the Q, K, V and output projection weights

    @classmethod
    def from_model_config(cls, model_cfg, seq_len: int) -> "Shape":
        # Imported here so that flops.py stays importable without building a model.
        from cgpt_jax.model import attention, attention_projection_params, params_count

        variant = attention.build(model_cfg.attention)
        return cls(
            vocab_size=model_cfg.vocab_size,
            d_model=model_cfg.d_model,
            n_layers=model_cfg.n_layers,
            d_ff=model_cfg.d_ff,
            seq_len=seq_len,
            attention_fwd_flops_per_token=variant.fwd_flops_per_token(model_cfg, seq_len),
            n_params=params_count(model_cfg),
            attention_projection_params=attention_projection_params(model_cfg),
        )


def flops_per_token(shape: Shape, convention: Convention = "palm") -> float:
    """Training FLOPs (forward + backward) per token under `convention`."""
    d, L, V = shape.d_model, shape.n_layers, shape.vocab_size
    block_matmul = L * (shape.attention_projection_params + 2 * d * shape.d_ff)
    mixing = L * shape.attention_fwd_flops_per_token
    if convention == "cerebras":
        return 6 * block_matmul + 6 * mixing + 10 * V * d
    if convention == "palm":
        return 6 * (block_matmul + V * d) + 3 * mixing
    if convention == "6n":
        return 6 * shape.n_params
    raise ValueError(f"unknown FLOP convention {convention!r}; choose one of {CONVENTIONS}")


def training_flops(shape: Shape, tokens: float, convention: Convention = "cerebras") -> float:
    """Total training FLOPs for `tokens` tokens."""
    return flops_per_token(shape, convention) * tokens


def mfu(tokens_per_sec: float, shape: Shape, peak_flops_per_sec: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s (palm convention) over the device peak."""
    return tokens_per_sec * flops_per_token(shape, "palm") / peak_flops_per_sec

