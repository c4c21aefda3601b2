"""Build (or find) the packed token store that `config.data` describes.

    python -m cgpt_jax.data.prepare --source=stdlib --tokenizer='bpe(vocab=1024)'
    python -m cgpt_jax.data.prepare --source=text_dir --text_dir=~/corpus --tokenizer=gpt2
    python -m cgpt_jax.data.prepare --source=tfds --tfds_name=lm1b --tfds_eval_split=test --tokenizer=gpt2

Every field of `default_data_config()` is a flag. Training calls the same `prepare` through
`make_dataset`, so running this first only moves the build out of the first training run.
"""
from __future__ import annotations

import contextlib
import json
import sys

import ml_collections
from absl import app, flags

from cgpt_jax import cli
from cgpt_jax.data import corpus, default_data_config
from cgpt_jax.data.store import Source, TokenStore, build_or_reuse

SOURCES = ("synthetic", "stdlib", "text_dir", "tfds")
PATH_FIELDS = ("cache_dir", "text_dir", "tfds_data_dir")  # resolved against the current directory


def source_from_config(data_cfg: ml_collections.ConfigDict) -> Source:
    if data_cfg.source == "stdlib":
        return corpus.stdlib_source(data_cfg.val_fraction)
    if data_cfg.source == "text_dir":
        return corpus.TextDirSource(data_cfg.text_dir, include=tuple(data_cfg.include),
                                    exclude=tuple(data_cfg.exclude), jsonl_text_key=data_cfg.jsonl_text_key,
                                    val_fraction=data_cfg.val_fraction)
    if data_cfg.source == "tfds":
        return corpus.TfdsSource(data_cfg.tfds_name, data_dir=data_cfg.tfds_data_dir,
                                 text_key=data_cfg.tfds_text_key, train_split=data_cfg.tfds_train_split,
                                 eval_split=data_cfg.tfds_eval_split, download=data_cfg.tfds_download)
    raise ValueError(f"config.data.source={data_cfg.source!r} has no token store; "
                     f"use one of {SOURCES[1:]} (or 'synthetic', which needs none)")


def prepare(data_cfg: ml_collections.ConfigDict) -> TokenStore:
    """The token store for `data_cfg`, built under `data_cfg.cache_dir` unless a matching one exists."""
    return build_or_reuse(source_from_config(data_cfg), data_cfg.tokenizer, data_cfg.cache_dir)


def define_flags(flag_values: flags.FlagValues) -> None:
    """One flag per field of `default_data_config()`, with its default. Only the commands that take them
    define them (here and `cgpt_jax.data.bench`), so importing this module defines no flags."""
    for key, default in default_data_config().items():
        help_text = f"config.data.{key}"
        if isinstance(default, bool):
            flags.DEFINE_bool(key, default, help_text, flag_values=flag_values)
        elif isinstance(default, tuple):
            flags.DEFINE_list(key, list(default), help_text + " (comma-separated)", flag_values=flag_values)
        elif isinstance(default, int):
            flags.DEFINE_integer(key, default, help_text, flag_values=flag_values)
        elif isinstance(default, float):
            flags.DEFINE_float(key, default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(key, default, help_text, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues) -> ml_collections.ConfigDict:
    """The data config that the flags of `define_flags` give, paths resolved."""
    cfg = default_data_config()
    for key, default in cfg.items():
        value = flag_values[key].value
        cfg[key] = tuple(value) if isinstance(default, tuple) else value
    for key in PATH_FIELDS:
        cfg[key] = cli.resolve_optional_path(cfg[key])
    return cfg


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout carries only the summary
        store = prepare(config_from_flags(flag_values))
    summary = {k: store.manifest[k] for k in ("source", "tokenizer", "splits", "build")}
    print(json.dumps({"store": str(store.path), **summary}, indent=1))


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    cli.run(main)
