"""Standard parameterization (SP) or Cerebras-GPT's muP: every rule in this one module.

`config.model.parameterization` selects it. Every parameter belongs to a group, which decides its init std,
its learning-rate multiplier, whether it is weight-decayed and the forward multipliers around it. With the
width multipliers m = d_model / mup_base_d_model and m_ff = d_ff / mup_base_d_ff (both 1 under SP):

    group        parameters                      init std       LR      decay  forward
    embedding    wte, wpe                        σ              η       yes    (wte + wpe)·m_emb; tied logits·1/m
    attn_input   qkv_kernel (gqa: q/kv_kernel)   σ/√m           η/m     yes    attention logits q·k / d_head
    mlp_input    up_kernel                       σ/√m           η/m     yes
    attn_output  out_kernel                      σ_out/√m       η/m     yes
    mlp_output   down_kernel                     σ_out/√m_ff    η/m_ff  yes
    head         a task head's score (finetune/) σ/√m           η/m     yes
    layernorm    ln_*/scale, ln_*/bias           1, 0           η       no
    bias         every *_bias                    0              η       no
    vector       gains, per-head scalars, ...    the module's   η       no

σ = model.init_std, σ_out = model.output_init_std (σ/√(2L) by default) and η = train.peak_lr are the values
of the base (proxy) width; m_emb = model.mup_embedding_multiplier. Under SP the same table holds with
m = m_ff = 1, m_emb = 1 and attention logits q·k/√d_head. Weight decay is decoupled and multiplied by
the group's learning rate (Cerebras's AdamBase), so under muP a hidden matrix's decay shrinks by 1/m too.

**Declarations.** A module declares a parameter's group where it creates it, as Variable metadata:
``nnx.Param(value, logical_axes=..., param_group="attn_input")`` (optionally ``weight_decay=True/False`` to
override the group's decay). The metadata travels with the parameter through nnx.state, vmap, jit and
the optimizer, so the init (`init_std`), the optimizer (`decays`, `lr_multiplier`) and the start-up table
(cgpt_jax/train/param_table.py) all read this one declaration. A parameter that declares nothing and has
at most one dimension per layer is a `vector` (a gain, a per-head scalar); one with more dimensions and
no declaration is an error, since its fan-in cannot be guessed.

Cerebras scales the MLP down projection with its own fan-in (d_ff, base 1024) and everything else in the
blocks with d_model (base 256); the published models all have d_ff = 4·d_model, where m_ff = m.
Facts: cgpt_jax/reference/cerebras_gpt.json (the published values, with sources), key `mup`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import ml_collections
from flax import nnx


# Variable metadata keys: a declaration (group, decay override), and how the module initialised the
# parameter when no group std did ('zeros', 'ones'; shown in the parameter table).
GROUP_KEY = "param_group"
DECAY_KEY = "weight_decay"
INIT_KEY = "init"


@dataclasses.dataclass(frozen=True)
class Group:
    """What the members of a parameter group share."""

    fan_in: Literal["d_model", "d_ff", "none"]  # the width their init std and learning rate scale with
    base_std: Literal["init_std", "output_init_std"] | None  # config field of the base init std; None: no std
    decays: bool  # decoupled weight decay applies


GROUPS: dict[str, Group] = {  # in the order of the parameter table
    "embedding": Group("none", "init_std", True),
    "attn_input": Group("d_model", "init_std", True),
    "mlp_input": Group("d_model", "init_std", True),
    "attn_output": Group("d_model", "output_init_std", True),
    "mlp_output": Group("d_ff", "output_init_std", True),
    "head": Group("d_model", "init_std", True),  # a task head reading the final hidden states (d_model in)
    "layernorm": Group("none", None, False),
    "bias": Group("none", None, False),
    "vector": Group("none", None, False),
}


def is_mup(model_cfg: ml_collections.ConfigDict) -> bool:
    return model_cfg.parameterization == "mup"


def width_multiplier(model_cfg: ml_collections.ConfigDict) -> float:
    """m = d_model / mup_base_d_model under muP; 1 under SP."""
    return model_cfg.d_model / model_cfg.mup_base_d_model if is_mup(model_cfg) else 1.0


def ff_width_multiplier(model_cfg: ml_collections.ConfigDict) -> float:
    """m_ff = d_ff / mup_base_d_ff under muP (the down projection's fan-in); 1 under SP."""
    return model_cfg.d_ff / model_cfg.mup_base_d_ff if is_mup(model_cfg) else 1.0


def param_group(name: str, param: nnx.Variable) -> str:
    """The group `param` declares, or 'vector' when it declares none and has at most one dimension per
    layer (a leading 'layers' axis, added by the stacked blocks, is not counted). `name` (its path, such
    as 'blocks/attn/qkv_kernel') is for the error messages."""
    metadata = param.get_metadata()
    group = metadata.get(GROUP_KEY)
    if group is not None:
        if group not in GROUPS:
            raise ValueError(f"parameter {name!r} declares {GROUP_KEY}={group!r}; the groups are {list(GROUPS)} "
                             f"(cgpt_jax/model/parameterization.py)")
        return group
    axes = metadata.get("logical_axes") or ()
    per_layer_ndim = param.ndim - (1 if axes[:1] == ("layers",) else 0)
    if per_layer_ndim <= 1:
        return "vector"
    raise ValueError(
        f"parameter {name!r} of shape {tuple(param.shape)} declares no parameterization group, and only "
        f"parameters of at most one dimension default to 'vector'; create it with "
        f"nnx.Param(..., {GROUP_KEY}=...), one of {list(GROUPS)} (the matrix groups say which fan-in its "
        f"muP init std and learning rate scale with; cgpt_jax.model.layers.weight_param draws such a matrix)")


def decays(name: str, param: nnx.Variable) -> bool:
    """Whether decoupled weight decay applies to `param`: its declared `weight_decay`, else its group's."""
    declared = param.get_metadata().get(DECAY_KEY)
    if declared is not None and not isinstance(declared, bool):
        raise ValueError(f"parameter {name!r} declares {DECAY_KEY}={declared!r}; use True or False")
    return GROUPS[param_group(name, param)].decays if declared is None else declared


def fan_in_multiplier(model_cfg: ml_collections.ConfigDict, group: str) -> float:
    """How much wider than the base this group's fan-in is: m, m_ff, or 1 (vectors and embeddings)."""
    fan_in = GROUPS[group].fan_in
    if fan_in == "d_model":
        return width_multiplier(model_cfg)
    if fan_in == "d_ff":
        return ff_width_multiplier(model_cfg)
    return 1.0


def init_std(model_cfg: ml_collections.ConfigDict, group: str) -> float:
    """Init std of a weight of `group` (one with a base std): the base std over √(fan-in multiplier)."""
    base_std = GROUPS[group].base_std
    if base_std is None:
        raise ValueError(f"group {group!r} has no init std: its parameters are initialised by their module")
    return model_cfg[base_std] / math.sqrt(fan_in_multiplier(model_cfg, group))


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
