"""The config schema: every field with its default, and validation that fails before any compile.

Experiment files (experiments/*.py) start from `base_config()` and override fields; the command line
overrides any field (``--config.model.d_model=512``). `validate` checks a resolved config against the
devices it will run on and raises errors that name the field and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import ml_collections

from cgpt_jax.data import default_data_config
from cgpt_jax.finetune.settings import BEST_METRICS, LOSSES, default_finetune_config, validate_finetune
from cgpt_jax.errors import InputError
from cgpt_jax.parallel.mesh import mesh_shape
from cgpt_jax.parallel.sharding import DEFAULT_RULES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse an experiment argument ``"size=111m,mup=True"`` against typed defaults (big_vision style)."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise InputError(f"config argument {item!r} — expected key=value with key in {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise InputError(f"config argument {key}={value!r} — expected True or False")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise InputError(f"config argument {key}={value!r} — expected a {kind.__name__}") from None
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
    ck.remote_metrics_flush_s = 30.0  # on gs:// / s3://: metrics.jsonl (one PUT of it all) at most this often

    c.finetune = default_finetune_config()  # text classification (cgpt_jax/finetune/settings.py)

    # Zero-shot tasks scored at each evaluation of pretraining (cgpt_jax/eval/during_training.py).
    c.eval = e = ml_collections.ConfigDict()
    e.tasks = ""  # comma-separated offline tasks (cgpt_jax/eval/tasks.py: TASKS), e.g. 'cgpt_stdlib_nextline'
    e.limit = 0  # documents per task: the first this many of `python -m cgpt_jax.evaluate tasks`'s; 0: all
    e.batch_size = 32  # rows per scoring batch
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


# --- range and type rules: one per field of base_config() (a test checks that none is missing) ---

@dataclasses.dataclass(frozen=True)
class Rule:
    """Which values a field accepts; `expected` says so in the error message (the fix)."""

    accepts: Callable[[Any], bool]
    expected: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _count(minimum: int = 1, sentinel: int | None = None, meaning: str = "") -> Rule:
    """An integer >= minimum, or the sentinel (-1) that `meaning` explains."""
    text = f"use an integer >= {minimum}" + (f", or {sentinel} for {meaning}" if sentinel is not None else "")
    return Rule(lambda v: _is_int(v) and (v >= minimum or v == sentinel), text)


def _positive(sentinel: float | None = None, meaning: str = "") -> Rule:
    text = "use a finite number > 0" + (f", or {sentinel} for {meaning}" if sentinel is not None else "")
    return Rule(lambda v: _is_number(v) and (v > 0 or v == sentinel), text)


def _non_negative() -> Rule:
    return Rule(lambda v: _is_number(v) and v >= 0, "use a finite number >= 0")


def _fraction(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Rule:
    def accepts(v: Any) -> bool:
        return _is_number(v) and (low < v if open_low else low <= v) and (v < high if open_high else v <= high)
    return Rule(accepts, f"use a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")


def _one_of(*names: str) -> Rule:
    return Rule(lambda v: v in names, f"use one of {', '.join(repr(n) for n in names)}")


def _text(non_empty: bool = False) -> Rule:
    return Rule(lambda v: isinstance(v, str) and (bool(v.strip()) or not non_empty),
                "use a non-empty string" if non_empty else "use a string")


_BOOL = Rule(lambda v: isinstance(v, bool), "use True or False")
_GLOBS = Rule(lambda v: isinstance(v, (tuple, list)) and all(isinstance(g, str) and g for g in v),
              "use a tuple of glob strings, e.g. ('*.txt', '*.md')")
_MESH_RULES = Rule(lambda v: isinstance(v, (tuple, list)) and all(
    isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in v),
    "use a list of [logical_axis, mesh_axes] pairs (cgpt_jax/parallel/sharding.py: DEFAULT_RULES)")


def _spec(parse: Callable[[str], Any], example: str) -> Rule:
    """A spec string that `parse` accepts (its own error, naming the problem, is reported too)."""
    def accepts(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        try:
            parse(v)
        except ValueError:
            return False
        return True
    return Rule(accepts, f"use a valid spec, e.g. {example!r}")


def _tokenizer_spec(spec: str) -> Any:
    from cgpt_jax.data.tokenizer import parse_spec
    return parse_spec(spec)


def _attention_spec(spec: str) -> Any:
    from cgpt_jax.model import attention
    return attention.build(spec)


def _eval_tasks_spec(names: str) -> Any:
    from cgpt_jax.eval.tasks import parse_task_names
    return parse_task_names(names)


_DTYPES = ("float32", "bfloat16", "float16")
_STEPS_MEANING = "train.tokens_per_param · parameters / tokens per step"
RULES: dict[str, Rule] = {
    "model.vocab_size": _count(1, -1, "the tokenizer's vocabulary"),
    "model.vocab_pad_multiple": _count(1),
    "model.d_model": _count(1),
    "model.n_layers": _count(1),
    "model.n_heads": _count(1),
    "model.d_ff": _count(1),
    "model.max_seq_len": _count(1),
    "model.attention": _spec(_attention_spec, "gqa(kv_heads=4)+rope"),
    "model.layer_norm_eps": _positive(),
    "model.init_std": _positive(),
    "model.output_init_std": _positive(-1.0, "init_std / sqrt(2 · n_layers)"),
    "model.param_dtype": _one_of(*_DTYPES),
    "model.compute_dtype": _one_of(*_DTYPES),
    "model.remat": _one_of("none", "full", "dots", "dots_no_batch"),
    "model.scan_layers": _BOOL,
    "model.parameterization": _one_of("sp", "mup"),
    "model.mup_base_d_model": _count(1),
    "model.mup_base_d_ff": _count(1),
    "model.mup_embedding_multiplier": _positive(),
    "train.seq_len": _count(1),
    "train.global_batch_size": _count(1),
    "train.micro_batches": _count(1),
    "train.tokens_per_param": _positive(),
    "train.steps": _count(1, -1, _STEPS_MEANING),
    "train.peak_lr": _positive(),
    "train.warmup_tokens": _non_negative(),
    "train.warmup_steps": _count(0, -1, "train.warmup_tokens / tokens per step"),
    "train.decay": _one_of("linear", "cosine"),
    "train.final_lr_fraction": _fraction(0, 1),
    "train.adam_b1": _fraction(0, 1, open_high=True),
    "train.adam_b2": _fraction(0, 1, open_high=True),
    "train.adam_eps": _positive(),
    "train.weight_decay": _non_negative(),
    "train.grad_clip_norm": _positive(),
    "train.seed": _count(0),
    "train.log_every": _count(1),
    "train.eval_every": _count(1),
    "train.device_peak_flops": _positive(-1.0, "the device kind's peak (measured on CPU)"),
    "mesh.data": _count(1, -1, "the devices the other axes leave"),
    "mesh.fsdp": _count(1, -1, "the devices the other axes leave"),
    "mesh.tensor": _count(1, -1, "the devices the other axes leave"),
    "mesh.rules": _MESH_RULES,
    "mesh.max_replicated_fraction": _fraction(0, 1),
    "data.source": _one_of("synthetic", "stdlib", "text_dir", "tfds"),
    "data.synthetic_vocab_size": _count(2),
    "data.eval_batches": _count(1),
    "data.prefetch": _count(0),
    "data.tokenizer": _spec(_tokenizer_spec, "bpe(vocab=1024)"),
    "data.cache_dir": _text(non_empty=True),
    "data.val_fraction": _fraction(0, 1, open_low=True, open_high=True),
    "data.text_dir": _text(),
    "data.include": _GLOBS,
    "data.exclude": _GLOBS,
    "data.jsonl_text_key": _text(non_empty=True),
    "data.tfds_name": _text(),
    "data.tfds_data_dir": _text(),
    "data.tfds_text_key": _text(),
    "data.tfds_train_split": _text(non_empty=True),
    "data.tfds_eval_split": _text(non_empty=True),
    "data.tfds_download": _BOOL,
    "checkpoint.every_steps": _count(0),  # 0: only at the last step and on preemption
    "checkpoint.keep_last": _count(1),
    "checkpoint.keep_every": _count(0),  # 0: none kept forever
    "checkpoint.async_save": _BOOL,
    "checkpoint.nan_policy": _one_of("halt", "skip"),
    "checkpoint.max_consecutive_skips": _count(0),
    "checkpoint.remote_metrics_flush_s": _non_negative(),  # 0: every logged step (a PUT per record)
    # Fine-tuning (cgpt_jax/finetune/settings.py; its rules across fields: validate_finetune).
    "finetune.task": _text(non_empty=True),
    "finetune.init": _text(),
    "finetune.from_scratch": _BOOL,
    "finetune.text_field": _text(non_empty=True),
    "finetune.label_field": _text(non_empty=True),
    "finetune.label_names": _text(),
    "finetune.val_fraction": _fraction(0, 1, open_low=True, open_high=True),
    "finetune.test_fraction": _fraction(0, 1, open_low=True, open_high=True),
    "finetune.loss": _one_of(*LOSSES),
    "finetune.best_metric": _one_of(*BEST_METRICS),
    "finetune.num_labels": _count(2, -1, "the number of labels in the data"),
    "finetune.length_buckets": _BOOL,
    "finetune.method": _text(non_empty=True),
    "eval.tasks": _spec(_eval_tasks_spec, "cgpt_stdlib_nextline,cgpt_stdlib_lastident"),
    "eval.limit": _count(0),  # 0: every document
    "eval.batch_size": _count(1),
}


def _spec_error(field: str, value: Any) -> str | None:
    """The spec parser's own message (it names the problem and the valid forms), for a spec field."""
    parse = {"model.attention": _attention_spec, "data.tokenizer": _tokenizer_spec,
             "eval.tasks": _eval_tasks_spec}.get(field)
    if parse is None or not isinstance(value, str):
        return None
    try:
        parse(value)
    except ValueError as e:
        return f"{field}={value!r} — {e}"
    return None


def field_errors(config: ml_collections.ConfigDict | dict, prefix: str = "") -> list[str]:
    """A `<field>=<value> — <fix>` line for each field of `config` (or of its section `prefix`, e.g.
    'checkpoint') that breaks its rule or is not in the schema."""
    values = flatten(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config,
                     f"{prefix}." if prefix else "")
    errors = []
    for field, value in values.items():
        rule = RULES.get(field)
        if rule is None:
            errors.append(f"{field} is not a config field — remove it (the fields: cgpt_jax/config.py: RULES)")
        elif not rule.accepts(value):
            errors.append(_spec_error(field, value) or f"{field}={value!r} — {rule.expected}")
    return errors


def validate(config: ml_collections.ConfigDict, n_devices: int) -> None:
    """Raise InputError listing every problem of a config that cannot run on `n_devices`: each field's
    range and type rule (RULES), then the rules across fields. Reads no data and compiles nothing."""
    from cgpt_jax import peft
    from cgpt_jax.model import attention

    errors = field_errors(config)
    if errors:  # the rules across fields below assume each field is usable
        raise InputError(f"invalid config ({len(errors)} problems):", *errors)
    m, t, d = config.model, config.train, config.data
    if m.d_model % m.n_heads:
        errors.append(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model} — "
                      f"pick heads so that d_model / n_heads is an integer.")
    if t.seq_len > m.max_seq_len:
        errors.append(f"train.seq_len={t.seq_len} is longer than the position table "
                      f"model.max_seq_len={m.max_seq_len} — lower seq_len or raise max_seq_len.")
    if t.global_batch_size % t.micro_batches:
        errors.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                      f"train.micro_batches={t.micro_batches} — pick a divisor of the batch.")
    if d.source == "text_dir" and not d.text_dir.strip():
        errors.append("data.text_dir is empty with data.source='text_dir' — set it to a directory of text files")
    if d.source == "tfds" and not d.tfds_name.strip():
        errors.append("data.tfds_name is empty with data.source='tfds' — set it to a TFDS name such as 'lm1b'")
    try:
        data, fsdp, tensor = mesh_shape(config.mesh, n_devices)
    except ValueError as e:
        errors.append(str(e))
    else:
        micro = t.global_batch_size // t.micro_batches
        if micro % (data * fsdp):
            errors.append(f"the micro-batch of {micro} sequences (train.global_batch_size="
                          f"{t.global_batch_size} / train.micro_batches={t.micro_batches}) is not divisible "
                          f"by mesh data×fsdp = {data}×{fsdp} — change the batch or the mesh.")
        if m.n_heads % tensor:
            errors.append(f"model.n_heads={m.n_heads} is not divisible by mesh.tensor={tensor} — "
                          f"pick a tensor axis that divides the heads.")
        if m.d_ff % tensor:
            errors.append(f"model.d_ff={m.d_ff} is not divisible by mesh.tensor={tensor} — "
                          f"pick a tensor axis that divides d_ff.")
    try:
        attention.build(m.attention).validate(m)
    except ValueError as e:
        errors.append(str(e))
    if config.eval.tasks.strip() and d.source == "synthetic":
        errors.append(f"eval.tasks={config.eval.tasks!r} needs a tokenizer but data.source='synthetic' has none "
                      f"— train on a text source (e.g. data.source='stdlib') or leave eval.tasks empty")
    errors += validate_finetune(config.finetune)
    errors += peft.validate_method(config.finetune.method, m, t.seq_len)
    if errors:
        raise InputError(f"invalid config ({len(errors)} problems):", *errors)


# Config fields a restart (or a re-run sweep) may change: where and how the run computes, what it logs,
# how it checkpoints. Results agree within float tolerance (bit for bit when only logging or
# checkpointing changes) and checkpoints stay compatible; any other difference means another run.
RESTART_MUTABLE_PREFIXES = ("mesh.", "checkpoint.", "eval.")
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
