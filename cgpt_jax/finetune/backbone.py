"""The pretrained decoder a classifier starts from (`finetune.init`): its model config, its tokenizer and
its parameters.

    finetune.init=RUN_DIR   a cgpt_jax training run: config.json's model, the tokenizer of its token store
                            (config.json's data_description), the newest complete checkpoint's parameters
    finetune.init=hf:DIR    a Hugging Face GPT-2-family directory (cgpt_jax/interop/hf.py): a language
                            model, or a GPT2ForSequenceClassification whose head is kept

Either may be local, gs:// or s3:// (an HF directory in a bucket is read through a temporary local copy).

Only reads: nothing in the backbone's directory is ever written.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import jax
import ml_collections
from flax import nnx

from tokenizers import Tokenizer

from cgpt_jax import storage
from cgpt_jax.data.tokenizer import TextTokenizer, TokenizerError
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.model import HEAD
from cgpt_jax.interop import hf
from cgpt_jax.peft import PEFT
from cgpt_jax.run_dir import CONFIG as RUN_CONFIG
from cgpt_jax.train import checkpoint

HF_PREFIX = "hf:"
InitParams = Callable[[nnx.State], nnx.State]


class BackboneError(InputError):
    """A backbone that cannot be used; the message names the file or field and the fix."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    init: str  # finetune.init as given
    model: ml_collections.ConfigDict  # the decoder's model config
    tokenizer: TextTokenizer
    num_labels: int  # of a classifier's head it already has; -1 for a language model


def _run_backbone(run_dir: storage.Path, init: str) -> Backbone:
    config_file = run_dir / RUN_CONFIG
    if not config_file.is_file():
        raise BackboneError(f"finetune.init={init}: {config_file} is not there; name a cgpt_jax run directory "
                            f"(what python -m cgpt_jax.train writes) or hf:DIR for a Hugging Face directory")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    store = raw.get("data_description", {}).get("store")
    tokenizer_file = storage.path(store or "", "tokenizer.json")
    if not store or not tokenizer_file.is_file():
        raise BackboneError(f"finetune.init={init}: the run's tokenizer {tokenizer_file} is not there (config.json "
                            f"data_description.store); a run on synthetic data has none. Re-create the token "
                            f"store with python -m cgpt_jax.data.prepare and the run's data config.")
    tokenizer = TextTokenizer(Tokenizer.from_str(tokenizer_file.read_text(encoding="utf-8")), raw["data"]["tokenizer"])
    return Backbone(init, ml_collections.ConfigDict(raw["model"]), tokenizer,
                    raw.get("finetune", {}).get("num_labels", -1))


# a language model, or a classifier whose head is kept (the task must have as many labels)
_HF_BACKBONES = {kind: hf.ARCHITECTURES[kind] + hf.CLASSIFIER_ARCHITECTURES.get(kind, ()) for kind in hf.ARCHITECTURES}


def _hf_backbone(location: str, init: str) -> Backbone:
    with hf.local_directory(location) as directory:  # a bucket's files: through a temporary local copy
        return _hf_backbone_from(directory, location, init)


def _hf_backbone_from(directory: pathlib.Path, location: str, init: str) -> Backbone:
    hf_cfg = hf.read_hf_config(directory, _HF_BACKBONES)
    is_classifier = hf.CLASSIFIER in (hf_cfg.get("architectures") or [])
    num_labels = len(hf.classifier_labels(hf_cfg, f"{location}/{hf.CONFIG_FILE}")) if is_classifier else -1
    model = hf.config_from_hf(hf_cfg).model
    tokenizer = hf.load_tokenizer(directory, hf_cfg["vocab_size"])
    if tokenizer is None:
        raise BackboneError(f"finetune.init={init}: {location} has no tokenizer.json (or vocab.json + "
                            f"merges.txt); copy the model's tokenizer files there")
    try:
        text_tokenizer = TextTokenizer(tokenizer, f"hf(dir={location})")
    except TokenizerError as e:
        raise BackboneError(f"finetune.init={init}: {e}") from None
    return Backbone(init, model, text_tokenizer, num_labels)


def load_backbone(init: str) -> Backbone:
    if not init:
        raise BackboneError("finetune.init is empty: name the pretrained backbone, a cgpt_jax run directory or "
                            "hf:DIR (with finetune.from_scratch=True only its shape and tokenizer are used)")
    if init.startswith(HF_PREFIX):
        return _hf_backbone(str(storage.path(init[len(HF_PREFIX):])), init)
    return _run_backbone(storage.path(init), init)


def check_fits(backbone: Backbone, num_labels: int) -> None:
    """The task's labels and the backbone's tokenizer agree with the backbone."""
    if backbone.num_labels not in (-1, num_labels):
        raise BackboneError(f"finetune.init={backbone.init} is a classifier of {backbone.num_labels} labels but "
                            f"the task has {num_labels}; start from its language model (the run it was "
                            f"fine-tuned from) or use a task with the same labels")
    if backbone.tokenizer.vocab_size > backbone.model.vocab_size:
        raise BackboneError(f"finetune.init={backbone.init}: its tokenizer has {backbone.tokenizer.vocab_size} "
                            f"tokens but the model's vocabulary is {backbone.model.vocab_size}; use the "
                            f"tokenizer the backbone was trained with")


def _without_head(params: nnx.State) -> nnx.State:
    """The parameters a backbone holds: without the task head and a PEFT method's added parameters."""
    return nnx.from_flat_state([(path, v) for path, v in nnx.to_flat_state(params) if path[0] not in (HEAD, PEFT)])


def _with_backbone(like: nnx.State, loaded: nnx.State) -> nnx.State:
    """`like` (the tree the run expects) with every tensor `loaded` holds taken from there."""
    values = dict(nnx.to_flat_state(loaded))
    return nnx.from_flat_state([(path, values.get(path, v)) for path, v in nnx.to_flat_state(like)])


def init_params(backbone: Backbone, abstract_params: nnx.State, mesh: jax.sharding.Mesh,
                rules: list) -> tuple[str, InitParams]:
    """(name, function) for the loop: the backbone's parameters in place of the seed's, the head kept
    fresh unless the backbone is a classifier with this head. Checked here, before anything compiles."""
    keep_head = backbone.num_labels != -1
    if backbone.init.startswith(HF_PREFIX):
        directory = backbone.init[len(HF_PREFIX):]

        def load_hf(like: nnx.State) -> nnx.State:
            load = hf.classifier_from_pretrained if keep_head else hf.from_pretrained
            model = load(directory, mesh=mesh, rules=rules).model
            params = _with_backbone(like, nnx.state(model, nnx.Param))
            return jax.device_put(params, jax.tree.map(lambda x: x.sharding, like))
        return directory, load_hf
    wanted = abstract_params if keep_head else _without_head(abstract_params)
    source = checkpoint.find_init_source(backbone.init, checkpoint.tensor_specs(wanted, "params/"),
                                         flag="finetune.init")

    def load_run(like: nnx.State) -> nnx.State:
        if keep_head:
            return checkpoint.load_init_params(source, like_params=like)
        return _with_backbone(like, checkpoint.load_init_params(source, like_params=_without_head(like)))
    return f"{source.directory}/{source.step}", load_run
