"""Standard parameterization (SP) or Cerebras-GPT's muP: every rule in this one module.

`config.model.parameterization` selects it. A parameter belongs to a group (by its name, `param_group`);
the group decides its init std, its learning-rate multiplier and the forward multipliers around it.
With the width multipliers m = d_model / mup_base_d_model and m_ff = d_ff / mup_base_d_ff (both 1 under SP):

    group        parameters                      init std       LR      forward
    embedding    wte, wpe                        σ              η       (wte + wpe)·m_emb; logits·1/m (tied head)
    attn_input   qkv_kernel (gqa: q/kv_kernel)   σ/√m           η/m     attention logits q·k / d_head
    mlp_input    up_kernel                       σ/√m           η/m
    attn_output  out_kernel                      σ_out/√m       η/m
    mlp_output   down_kernel                     σ_out/√m_ff    η/m_ff
    layernorm    ln_*/scale, ln_*/bias           1, 0           η
    bias         every other *bias               0              η

σ = model.init_std, σ_out = model.output_init_std (σ/√(2L) by default) and η = train.peak_lr are the values
of the base (proxy) width; m_emb = model.mup_embedding_multiplier. Under SP the same table holds with
m = m_ff = 1, m_emb = 1 and attention logits q·k/√d_head. Weight decay is decoupled and multiplied by
the group's learning rate (Cerebras's AdamBase), so under muP a hidden matrix's decay shrinks by 1/m too.

Cerebras scales the MLP down projection with its own fan-in (d_ff, base 1024) and everything else in the
blocks with d_model (base 256); the published models all have d_ff = 4·d_model, where m_ff = m.
Facts: cgpt_jax/reference/cerebras_gpt.json (the published values, with sources), key `mup`.
"""
from __future__ import annotations

import math

import ml_collections

PARAMETERIZATIONS = ("sp", "mup")
GROUPS = ("embedding", "attn_input", "mlp_input", "attn_output", "mlp_output", "layernorm", "bias")

# Weight matrices by parameter name. A variant that adds a matrix names its group here.
MATRIX_GROUPS = {
    "wte": "embedding",
    "wpe": "embedding",
    "qkv_kernel": "attn_input",
    "q_kernel": "attn_input",
    "kv_kernel": "attn_input",
    "up_kernel": "mlp_input",
    "out_kernel": "attn_output",
    "down_kernel": "mlp_output",
}
LAYERNORM_MODULES = ("ln_attn", "ln_mlp", "ln_f")


def is_mup(model_cfg: ml_collections.ConfigDict) -> bool:
    return model_cfg.parameterization == "mup"


def validate(model_cfg: ml_collections.ConfigDict) -> list[str]:
    """Errors (field and fix) for the parameterization fields; empty when they are usable."""
    m = model_cfg
    if m.parameterization not in PARAMETERIZATIONS:
        return [f"model.parameterization={m.parameterization!r}: use 'sp' (standard) or 'mup' "
                f"(Cerebras-GPT's maximal update parameterization)."]
    errors = []
    for field in ("mup_base_d_model", "mup_base_d_ff", "mup_embedding_multiplier"):
        if not m[field] > 0:
            errors.append(f"model.{field}={m[field]!r} must be positive (Cerebras-GPT-muP: base width 256, "
                          f"base d_ff 1024, embedding multiplier 10).")
    return errors


def width_multiplier(model_cfg: ml_collections.ConfigDict) -> float:
    """m = d_model / mup_base_d_model under muP; 1 under SP."""
    return model_cfg.d_model / model_cfg.mup_base_d_model if is_mup(model_cfg) else 1.0


def ff_width_multiplier(model_cfg: ml_collections.ConfigDict) -> float:
    """m_ff = d_ff / mup_base_d_ff under muP (the down projection's fan-in); 1 under SP."""
    return model_cfg.d_ff / model_cfg.mup_base_d_ff if is_mup(model_cfg) else 1.0


def param_group(name: str) -> str:
    """The group of a parameter path such as 'blocks/attn/qkv_kernel' or 'ln_f/bias'."""
    parts = name.split("/")
    if len(parts) > 1 and parts[-2] in LAYERNORM_MODULES:
        return "layernorm"
    if parts[-1] in MATRIX_GROUPS:
        return MATRIX_GROUPS[parts[-1]]
    if parts[-1].endswith("bias"):
        return "bias"
    raise ValueError(f"parameter {name!r} belongs to no parameterization group; add its name to MATRIX_GROUPS "
                     f"in cgpt_jax/model/parameterization.py (which fan-in its init and LR scale with)")


def fan_in_multiplier(model_cfg: ml_collections.ConfigDict, group: str) -> float:
    """How much wider than the base this group's fan-in is: m, m_ff, or 1 (vectors and embeddings)."""
    if group in ("attn_input", "mlp_input", "attn_output"):
        return width_multiplier(model_cfg)
    if group == "mlp_output":
        return ff_width_multiplier(model_cfg)
    return 1.0


def init_std(model_cfg: ml_collections.ConfigDict, name: str) -> float:
    """Init std of the weight matrix `name` (a key of MATRIX_GROUPS): the base std over √(fan-in multiplier)."""
    group = MATRIX_GROUPS[name]
    base = model_cfg.output_init_std if group in ("attn_output", "mlp_output") else model_cfg.init_std
    return base / math.sqrt(fan_in_multiplier(model_cfg, group))


def lr_multiplier(model_cfg: ml_collections.ConfigDict, group: str) -> float:
    """The group's learning rate relative to train.peak_lr (Adam: 1 / fan-in multiplier)."""
    return 1.0 / fan_in_multiplier(model_cfg, group)


def embedding_multiplier(model_cfg: ml_collections.ConfigDict) -> float:
    """Applied to the token + position embedding sum."""
    return model_cfg.mup_embedding_multiplier if is_mup(model_cfg) else 1.0


def output_logits_multiplier(model_cfg: ml_collections.ConfigDict) -> float:
    """Applied to the LM head's logits: 1/m, so the tied head's output does not grow with width."""
    return 1.0 / width_multiplier(model_cfg)


def attention_scale(model_cfg: ml_collections.ConfigDict) -> float:
    """The attention-logit scale every variant uses: 1/d_head under muP, 1/√d_head under SP."""
    head_dim = model_cfg.d_model // model_cfg.n_heads
    return 1.0 / head_dim if is_mup(model_cfg) else 1.0 / head_dim**0.5
