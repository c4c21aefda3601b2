"""The bad-input catalogue (docs/errors.md): each input a user gets wrong is refused before work starts with
a message naming the problem and the fix, and nothing in the workdir, data cache or checkpoint is created
or changed. Commands exit with status 2 and print `error: ...` lines without a traceback.

Most cases call the Python API (no process start-up); the command-line cases run concurrently."""
from __future__ import annotations

import json
import math
import os
import pathlib
import random
import subprocess
import sys

import ml_collections
import pytest

from cgpt_jax.config import RULES, base_config, flatten, validate
from cgpt_jax.errors import InputError
from cgpt_jax.experiment_files import unknown_fields
from cgpt_jax.interop import hf
from cgpt_jax.train.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=experiments/cerebras_gpt.py:size=tiny"


def _tiny() -> ml_collections.ConfigDict:
    c = base_config()
    m, t = c.model, c.train
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 64, 32, 2, 4, 64, 16
    t.seq_len, t.global_batch_size, t.steps = 16, 8, 4
    c.data.synthetic_vocab_size = 64
    return c


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


# (field, value, what the message says): refused by config.validate, called first by train_and_evaluate.
CONFIG_CASES = [
    ("train.steps", -5, "train.steps=-5 — use an integer >= 1, or -1 for"),
    ("train.steps", 0, "train.steps=0 — use an integer >= 1"),
    ("train.peak_lr", -1.0, "train.peak_lr=-1.0 — use a finite number > 0"),
    ("train.peak_lr", math.nan, "train.peak_lr=nan — use a finite number > 0"),
    ("train.peak_lr", math.inf, "train.peak_lr=inf — use a finite number > 0"),
    ("data.tokenizer", "bpe(vocab=-1)", "vocab must be an integer >= 257"),
    ("data.tokenizer", "sentencepiece", "is not a tokenizer spec; use one of"),
    ("data.tokenizer", "hf", "needs ['dir']"),
    ("train.adam_b1", 1.0, "train.adam_b1=1.0 — use a number in [0, 1)"),
    ("train.adam_b2", -0.1, "train.adam_b2=-0.1 — use a number in [0, 1)"),
    ("train.adam_eps", 0.0, "train.adam_eps=0.0 — use a finite number > 0"),
    ("train.final_lr_fraction", 1.5, "train.final_lr_fraction=1.5 — use a number in [0, 1]"),
    ("train.weight_decay", -0.1, "train.weight_decay=-0.1 — use a finite number >= 0"),
    ("train.grad_clip_norm", 0.0, "train.grad_clip_norm=0.0 — use a finite number > 0"),
    ("train.warmup_steps", -3, "train.warmup_steps=-3 — use an integer >= 0, or -1 for"),
    ("train.warmup_tokens", -1.0, "train.warmup_tokens=-1.0 — use a finite number >= 0"),
    ("train.tokens_per_param", 0.0, "train.tokens_per_param=0.0 — use a finite number > 0"),
    ("train.global_batch_size", 0, "train.global_batch_size=0 — use an integer >= 1"),
    ("train.micro_batches", 0, "train.micro_batches=0 — use an integer >= 1"),
    ("train.micro_batches", 3, "not divisible by train.micro_batches=3 — pick a divisor"),
    ("train.log_every", 0, "train.log_every=0 — use an integer >= 1"),
    ("train.eval_every", -1, "train.eval_every=-1 — use an integer >= 1"),
    ("train.seed", -1, "train.seed=-1 — use an integer >= 0"),
    ("train.decay", "exponential", "train.decay='exponential' — use one of 'linear', 'cosine'"),
    ("train.seq_len", 32, "longer than the position table model.max_seq_len=16"),
    ("model.n_heads", 5, "model.n_heads=5 does not divide model.d_model=32"),
    ("model.d_model", 0, "model.d_model=0 — use an integer >= 1"),
    ("model.vocab_size", 0, "model.vocab_size=0 — use an integer >= 1, or -1 for the tokenizer's vocabulary"),
    ("model.layer_norm_eps", -1e-5, "model.layer_norm_eps=-1e-05 — use a finite number > 0"),
    ("model.init_std", 0.0, "model.init_std=0.0 — use a finite number > 0"),
    ("model.remat", "some", "model.remat='some' — use one of 'none', 'full'"),
    ("model.compute_dtype", "float8", "model.compute_dtype='float8' — use one of 'float32'"),
    ("model.parameterization", "mu_p", "model.parameterization='mu_p' — use one of 'sp', 'mup'"),
    ("model.attention", "warp_drive", "unknown attention variant 'warp_drive'"),
    ("model.attention", "gqa(kv_heads=3)", "kv_heads"),
    ("mesh.data", 0, "mesh.data=0 — use an integer >= 1, or -1 for"),
    ("mesh.data", 3, "has 3 devices but 8 are available"),
    ("mesh.max_replicated_fraction", 2.0, "mesh.max_replicated_fraction=2.0 — use a number in [0, 1]"),
    ("data.source", "web", "data.source='web' — use one of 'synthetic', 'stdlib', 'text_dir', 'tfds'"),
    ("data.source", "text_dir", "data.text_dir is empty with data.source='text_dir' — set it"),
    ("data.source", "tfds", "data.tfds_name is empty with data.source='tfds' — set it"),
    ("data.val_fraction", 0.0, "data.val_fraction=0.0 — use a number in (0, 1)"),
    ("data.eval_batches", 0, "data.eval_batches=0 — use an integer >= 1"),
    ("data.cache_dir", "", "data.cache_dir='' — use a non-empty string"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last=0 — use an integer >= 1"),
    ("checkpoint.nan_policy", "explode", "checkpoint.nan_policy='explode' — use one of 'halt', 'skip'"),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps=-1 — use an integer >= 0"),
]


@pytest.mark.parametrize("field, value, message", CONFIG_CASES, ids=[f"{f}={v}" for f, v, _ in CONFIG_CASES])
def test_config_refused_before_anything_is_read_or_written(tmp_path, field, value, message):
    config = _tiny()
    config.data.cache_dir = str(tmp_path / "cache")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(InputError) as info:
        train_and_evaluate(config, str(tmp_path / "run"), devices=None, show_progress=False)
    assert message in str(info.value)
    assert os.listdir(tmp_path) == []  # no workdir, no data cache


def test_every_schema_field_has_a_rule_and_the_defaults_pass():
    assert sorted(flatten(base_config().to_dict())) == sorted(RULES)
    validate(base_config(), 1)


def test_all_problems_of_a_config_are_reported_together():
    config = _tiny()
    config.train.steps, config.train.peak_lr, config.data.tokenizer = -5, -1.0, "bpe(vocab=-1)"
    with pytest.raises(InputError) as info:
        validate(config, 1)
    assert str(info.value).startswith("invalid config (3 problems):")
    assert [line.partition("=")[0] for line in info.value.problems[1:]] == [
        "data.tokenizer", "train.peak_lr", "train.steps"]


def test_another_runs_workdir_is_refused_and_left_unchanged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"d_model": 48}}))
    before = _snapshot(tmp_path)
    config = _tiny()
    config.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(InputError, match=r"(?s)holds another run's config.*model.d_model: 48 → 32.*--overwrite"):
        train_and_evaluate(config, str(run), show_progress=False)
    assert _snapshot(tmp_path) == before


def test_init_from_nowhere_is_refused_before_the_workdir(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        train_and_evaluate(_tiny(), str(tmp_path / "run"), init_from=str(tmp_path / "nowhere"), show_progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("files, message", [
    ({}, "has no config.json"),
    ({"config.json": "{"}, "is not valid JSON"),
    ({"config.json": "[1]"}, "holds a JSON list, not an object"),
    ({"config.json": json.dumps({"model_type": "llama"})}, "model_type='llama'; only GPT-2-family"),
])
def test_bad_hf_directory_is_refused_and_left_unchanged(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = _snapshot(tmp_path)
    with pytest.raises(hf.HFCheckpointError, match=message):
        hf.from_pretrained(tmp_path)
    assert _snapshot(tmp_path) == before


def test_tokenizer_directory_without_files_is_refused(tmp_path):
    from cgpt_jax.data.tokenizer import TokenizerError, load_tokenizer

    with pytest.raises(TokenizerError, match="has neither tokenizer.json nor vocab.json"):
        load_tokenizer(f"hf(dir={tmp_path})")
    assert os.listdir(tmp_path) == []


def test_unknown_config_field_suggests_the_name():
    config = base_config()
    assert unknown_fields(config, ["model.nheads", "model.n_heads", "modl.d_model", "train.peak_lr.x"],
                          "config") == [
        "--config.model.nheads: config.model has no field 'nheads' — did you mean --config.model.n_heads?",
        "--config.modl.d_model: config has no field 'modl' — did you mean --config.model?",
        "--config.train.peak_lr.x: config.train.peak_lr has no field 'x' — config.train.peak_lr is not a section"]


def _run_concurrently(commands: list[list[str]], cwd: pathlib.Path) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("CGPT_JAX_DEBUG", None)
    procs = [subprocess.Popen([sys.executable, "-m", *c], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def test_commands_refuse_bad_input_with_status_2_and_no_traceback(tmp_path):
    """One command per CLI and the issue's inputs, started together; each leaves tmp_path as it was."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    train = ["cgpt_jax.train", TINY, f"--workdir={run}", f"--config.data.cache_dir={cache}"]
    (tmp_path / "empty_sweep").mkdir()
    cases = [
        (train + ["--config.train.steps=-5"], "train.steps=-5 — use an integer >= 1"),
        (train + ["--config.train.peak_lr=-1"], "train.peak_lr=-1.0 — use a finite number > 0"),
        (train + ["--config.data.tokenizer=bpe(vocab=-1)"], "vocab must be an integer >= 257"),
        (train + ["--config.model.nheads=4"], "config.model has no field 'nheads' — did you mean "
                                              "--config.model.n_heads?"),
        (train + ["--config.model.n_heads=abc"], "--config.model.n_heads=abc: invalid literal for int()"),
        (["cgpt_jax.train", "--config=experiments/cerebras_gpt.py:size=7b", f"--workdir={run}"],
         "unknown size '7b'; choose one of"),
        (["cgpt_jax.train", "--config=experiments/cerebras_gpt.py:sise=tiny", f"--workdir={run}"],
         "config argument 'sise=tiny' — expected key=value with key in ['mup', 'size']"),
        (["cgpt_jax.train", "--config=experiments/nope.py", f"--workdir={run}"],
         "experiment file experiments/nope.py not found"),
        (["cgpt_jax.train", TINY], "Flag --workdir must have a value other than None"),
        (["cgpt_jax.sweep", "--config=experiments/nope.py", f"--workdir={run}"],
         "experiment file experiments/nope.py not found"),
        (["cgpt_jax.analyze", str(tmp_path / "empty_sweep")], "error: "),
        (["cgpt_jax.analyze", str(run), "--reference=cerebras", "--group_by=model.attention"],
         "--reference overlays one curve — drop it with --group_by"),
        (["cgpt_jax.generate", f"--checkpoint={tmp_path / 'none'}", "--prompt_ids=1"],
         "no config.json there; give a training run directory or a Hugging Face model directory"),
        (["cgpt_jax.plan", TINY, "--mesh=data=1", "--device=tpu_v9", "--config.model.vocab_size=64"],
         "unknown device kind 'tpu_v9'"),
        (["cgpt_jax.data.prepare", "--source=stdlib", "--tokenizer=bpe(vocab=-1)", f"--cache_dir={cache}"],
         "vocab must be an integer >= 257"),
        (["cgpt_jax.mup_check", "--widths=64", f"--out={run}"], "--widths needs at least two widths"),
        (["cgpt_jax.tools.chaos", "extra"], "unexpected arguments: ['extra']"),
    ]
    before = _snapshot(tmp_path)
    results = _run_concurrently([c for c, _ in cases], REPO)
    for (command, message), result in zip(cases, results):
        shown = f"{command}\n{result.stderr[-3000:]}"
        assert result.returncode == 2, shown
        assert message in result.stderr and "error: " in result.stderr, shown
        assert "Traceback" not in result.stderr, shown
    assert _snapshot(tmp_path) == before


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return 1 / 0\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "CGPT_JAX_DEBUG": "1"}
    debug = subprocess.run([sys.executable, "-m", "cgpt_jax.plan", "--config=experiments/cerebras_gpt.py:size=7b",
                            "--devices=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "error: " in debug.stderr
    env.pop("CGPT_JAX_DEBUG")
    internal = subprocess.run([sys.executable, "-m", "cgpt_jax.plan", f"--config={broken}", "--devices=1"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert internal.returncode == 1 and "ZeroDivisionError" in internal.stderr and "Traceback" in internal.stderr


# --- property: random fields and values never crash validate, and never pass out of range -------------

_VALUES = {
    int: [-7, -1, 0, 1, 2, 3, 8, 64, 10**9],
    float: [-1.0, -0.0, 0.0, 1e-12, 0.5, 1.0, 2.0, 1e9, math.nan, math.inf, -math.inf],
    str: ["", " ", "x", "dense", "bpe(vocab=-1)", "bpe(vocab=300)", "gqa(kv_heads=2)+rope", "cosine", "halt",
          "float16", "mup", "((", "hf(dir=)"],
    bool: [True, False],
}


def _in_range(field: str, value) -> bool:
    """An independent statement of the numeric ranges the issue asks for (not RULES itself)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    name = field.split(".")[1]
    if name in ("adam_b1", "adam_b2"):
        return 0 <= value < 1
    if name in ("final_lr_fraction", "max_replicated_fraction"):
        return 0 <= value <= 1
    if name in ("peak_lr", "adam_eps", "layer_norm_eps", "init_std", "tokens_per_param"):
        return value > 0
    if name in ("steps", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "global_batch_size",
                "micro_batches", "keep_last", "log_every", "eval_every"):
        return value >= 1 or (name == "steps" and value == -1)
    return True


def test_random_fields_and_values_are_refused_cleanly_or_in_range():
    rng = random.Random(0)
    defaults = flatten(base_config().to_dict())
    scalar_fields = [f for f, v in defaults.items() if type(v) in _VALUES]
    for _ in range(400):
        config = _tiny()
        changed = rng.sample(scalar_fields, rng.randint(1, 3))
        for field in changed:
            section, name = field.split(".")
            config[section][name] = rng.choice(_VALUES[type(defaults[field])])
        try:
            validate(config, 1)
        except InputError as e:  # any other exception fails the test: a crash, not a refusal
            assert any(field in str(e) or "mesh" in str(e) for field in changed), str(e)
            continue
        for field in changed:
            section, name = field.split(".")
            assert _in_range(field, config[section][name]), (field, config[section][name])


def test_unknown_fields_and_misspellings_are_refused():
    rng = random.Random(1)
    fields = list(RULES)
    for _ in range(100):
        field = rng.choice(fields)
        section, name = field.split(".")
        cut = rng.randrange(len(name))
        misspelled = name[:cut] + rng.choice("xyz_") + name[cut + 1:]
        if misspelled in base_config()[section]:
            continue
        problems = unknown_fields(base_config(), [f"{section}.{misspelled}"], "config")
        assert len(problems) == 1 and problems[0].startswith(f"--config.{section}.{misspelled}: ")
        as_dict = base_config().to_dict()
        as_dict[section][misspelled] = 1
        with pytest.raises(InputError, match=rf"{section}\.{misspelled} is not a config field"):
            validate(ml_collections.ConfigDict(as_dict), 1)
