"""The config schema: every field with its default, and validation that fails before any compile.

Experiment files (experiments/*.py) start from `base_config()` and override fields; the command line
overrides any field (``--config.model.d_model=512``). `validate` checks a resolved config against the
devices it will run on and raises errors that name the field and the fix.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from cgpt_jax.data import default_data_config
from cgpt_jax.parallel.mesh import mesh_shape
from cgpt_jax.parallel.sharding import DEFAULT_RULES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse an experiment argument ``"size=111m,mup=True"`` against typed defaults (big_vision style)."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r}: expected True or False")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = kind(value)
    return out


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = -1  # -1: follow the dataset's tokenizer
    m.vocab_pad_multiple = 1  # pad the embedding rows (e.g. 128) so 'vocab' can be sharded; loss unchanged
    m.d_model = 768
    m.n_layers = 12
    m.n_heads = 12
    m.d_ff = 3072
    m.max_seq_len = 2048  # rows of the learned position table
    m.attention = "dense"  # attention variant, call syntax: 'dense', 'gqa(kv_heads=4)', ...
    m.layer_norm_eps = 1e-5
    m.init_std = 0.02
    m.output_init_std = -1.0  # attention-out and MLP-down init std; -1: init_std / sqrt(2 · n_layers)
    m.param_dtype = "float32"
    m.compute_dtype = "float32"  # 'bfloat16' on accelerators
    m.remat = "none"  # 'none' | 'full' | 'dots' | 'dots_no_batch'
    m.scan_layers = True  # apply the layers with a scan (compile time independent of depth) or unrolled
    # 'sp' | 'mup' (cgpt_jax/model/parameterization.py). Under muP, init_std, output_init_std and
    # train.peak_lr are the base (proxy-width) values and the fields below set the width multipliers.
    m.parameterization = "sp"
    m.mup_base_d_model = 256  # m = d_model / 256 (Cerebras-GPT-muP's 40M proxy)
    m.mup_base_d_ff = 1024  # m_ff = d_ff / 1024: the MLP down projection's fan-in multiplier
    m.mup_embedding_multiplier = 10.0  # m_emb, applied to the token + position embedding sum

    c.train = t = ml_collections.ConfigDict()
    t.seq_len = 2048
    t.global_batch_size = 120  # sequences per optimizer step
    t.micro_batches = 1  # gradient accumulation: the global batch is split into this many micro-batches
    t.tokens_per_param = 20.0  # used when steps == -1
    t.steps = -1  # -1: tokens_per_param · params / (global_batch_size · seq_len)
    t.peak_lr = 6e-4
    t.warmup_tokens = 375e6  # ≈375M tokens for every Cerebras-GPT size; used when warmup_steps == -1
    t.warmup_steps = -1
    t.decay = "linear"  # 'linear' | 'cosine', from the peak down to final_lr_fraction · peak
    t.final_lr_fraction = 0.1
    t.adam_b1 = 0.9
    t.adam_b2 = 0.95
    t.adam_eps = 1e-8
    t.weight_decay = 0.1  # decoupled (multiplied by the LR); not applied to biases or LayerNorm
    t.grad_clip_norm = 1.0
    t.seed = 0
    t.log_every = 10
    t.eval_every = 200  # also evaluated at the last step
    t.device_peak_flops = -1.0  # per device, for MFU; -1: from the device kind (measured on CPU)

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1
    ms.fsdp = 1
    ms.tensor = 1
    ms.rules = [list(rule) for rule in DEFAULT_RULES]
    ms.max_replicated_fraction = 0.1  # refuse meshes with fsdp/tensor > 1 that replicate more than this

    c.data = default_data_config()

    # Checkpoints and faults (cgpt_jax/train/checkpoint.py, faults.py); a restart may change any of these.
    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every_steps = 1000  # save every this many steps; also always at the last step and on SIGTERM/SIGINT
    ck.keep_last = 3  # keep the newest this many checkpoints
    ck.keep_every = 0  # also keep, forever, every checkpoint whose step is a multiple of this; 0: none
    ck.async_save = True  # write in a background thread while training continues
    ck.nan_policy = "halt"  # non-finite loss or gradients: 'halt' (diagnose and stop) | 'skip' (drop that update)
    ck.max_consecutive_skips = 10  # 'skip' still halts when more steps than this in a row are non-finite
    return c


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill the derived fields (-1 sentinels that need only the config itself). Returns a copy."""
    from cgpt_jax.model import params_count

    c = ml_collections.ConfigDict(config.to_dict())
    m, t = c.model, c.train
    if m.output_init_std == -1.0:
        m.output_init_std = m.init_std / (2 * m.n_layers) ** 0.5
    if m.vocab_size > 0:
        tokens_per_step = t.global_batch_size * t.seq_len
        if t.steps == -1:
            t.steps = int(t.tokens_per_param * params_count(m) // tokens_per_step)
        if t.warmup_steps == -1:
            t.warmup_steps = int(t.warmup_tokens // tokens_per_step)
    return c


def validate(config: ml_collections.ConfigDict, n_devices: int) -> None:
    """Raise ValueError for a config that cannot run on `n_devices`, naming the field and the fix."""
    from cgpt_jax.model import attention, parameterization

    m, t = config.model, config.train
    errors = parameterization.validate(m)
    if m.d_model % m.n_heads:
        errors.append(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
                      f"pick heads so that d_model / n_heads is an integer.")
    if t.seq_len > m.max_seq_len:
        errors.append(f"train.seq_len={t.seq_len} is longer than the position table "
                      f"model.max_seq_len={m.max_seq_len}; lower seq_len or raise max_seq_len.")
    for field, value in (("model.compute_dtype", m.compute_dtype), ("model.param_dtype", m.param_dtype)):
        if value not in ("float32", "bfloat16", "float16"):
            errors.append(f"{field}={value!r}: use 'float32', 'bfloat16' or 'float16'.")
    from cgpt_jax.model.gpt import REMAT_POLICIES

    if m.remat != "none" and m.remat not in REMAT_POLICIES:
        errors.append(f"model.remat={m.remat!r}: use 'none' or one of {sorted(REMAT_POLICIES)}.")
    if t.decay not in ("linear", "cosine"):
        errors.append(f"train.decay={t.decay!r}: use 'linear' or 'cosine'.")
    if t.micro_batches < 1 or t.global_batch_size % t.micro_batches:
        errors.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                      f"train.micro_batches={t.micro_batches}.")
    try:
        data, fsdp, tensor = mesh_shape(config.mesh, n_devices)
    except ValueError as e:
        errors.append(str(e))
    else:
        micro = t.global_batch_size // max(t.micro_batches, 1)
        if micro % (data * fsdp):
            errors.append(f"the micro-batch of {micro} sequences (train.global_batch_size="
                          f"{t.global_batch_size} / train.micro_batches={t.micro_batches}) is not divisible "
                          f"by mesh data×fsdp = {data}×{fsdp}; change the batch or the mesh.")
        if m.n_heads % tensor:
            errors.append(f"model.n_heads={m.n_heads} is not divisible by mesh.tensor={tensor}.")
        if m.d_ff % tensor:
            errors.append(f"model.d_ff={m.d_ff} is not divisible by mesh.tensor={tensor}.")
    try:
        attention.build(m.attention).validate(m)
    except ValueError as e:
        errors.append(str(e))
    if errors:
        raise ValueError("invalid config:\n- " + "\n- ".join(errors))


# Config fields a restart (or a re-run sweep) may change: where and how the run computes, what it logs,
# how it checkpoints. Results agree within float tolerance (bit for bit when only logging or
# checkpointing changes) and checkpoints stay compatible; any other difference means another run.
RESTART_MUTABLE_PREFIXES = ("mesh.", "checkpoint.")
RESTART_MUTABLE_FIELDS = ("train.micro_batches", "train.log_every", "train.eval_every", "train.device_peak_flops",
                          "model.remat", "model.scan_layers")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'d_model': 8}} → {'model.d_model': 8}."""
    out = {}
    for key, value in config.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def run_differences(previous: dict, current: dict) -> list[str]:
    """Lines naming the config fields that make `current` another run than `previous` (config dicts as
    recorded in JSON). Empty: the same run. Ignored: restart-mutable fields, and fields `previous` lacks
    whose current value is base_config()'s default (a field added since keeps the old behaviour there)."""
    old, new = flatten(previous), flatten(json.loads(json.dumps(current)))
    defaults = flatten(json.loads(json.dumps(base_config().to_dict())))

    def differs(k: str) -> bool:
        if k not in old and k in defaults and new.get(k) == defaults[k]:
            return False
        return old.get(k) != new.get(k) and not k.startswith(RESTART_MUTABLE_PREFIXES) \
            and k not in RESTART_MUTABLE_FIELDS

    return [f"  {k}: {old.get(k, '<absent>')!r} → {new.get(k, '<absent>')!r}"
            for k in sorted(set(old) | set(new)) if differs(k)]
