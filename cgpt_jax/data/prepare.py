"""Build (or find) the packed token store that `config.data` describes.

    python -m cgpt_jax.data.prepare --source=stdlib --tokenizer='bpe(vocab=1024)'
    python -m cgpt_jax.data.prepare --source=text_dir --text_dir=~/corpus --tokenizer=gpt2
    python -m cgpt_jax.data.prepare --source=tfds --tfds_name=lm1b --tfds_eval_split=test --tokenizer=gpt2

Every field of `default_data_config()` is a flag. Training calls the same `prepare` through
`make_dataset`, so running this first only moves the build out of the first training run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

import ml_collections

from cgpt_jax.data import corpus, default_data_config
from cgpt_jax.data.store import Source, TokenStore, build_or_reuse

SOURCES = ("synthetic", "stdlib", "text_dir", "tfds")


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


def config_from_args(argv: list[str]) -> ml_collections.ConfigDict:
    cfg = default_data_config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in cfg.items():
        if isinstance(default, bool):
            parser.add_argument(f"--{key}", type=lambda v: v.lower() in ("1", "true", "yes"), default=default)
        elif isinstance(default, tuple):
            parser.add_argument(f"--{key}", type=lambda v: tuple(filter(None, v.split(","))), default=default,
                                help="comma-separated")
        else:
            parser.add_argument(f"--{key}", type=type(default), default=default)
    for key, value in vars(parser.parse_args(argv)).items():
        cfg[key] = value
    return cfg


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout carries only the summary
        store = prepare(config_from_args(sys.argv[1:] if argv is None else argv))
    summary = {k: store.manifest[k] for k in ("source", "tokenizer", "splits", "build")}
    print(json.dumps({"store": str(store.path), **summary}, indent=1))


if __name__ == "__main__":
    main()
