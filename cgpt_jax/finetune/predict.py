"""A fine-tuned classifier's predictions (`python -m cgpt_jax.classify`).

`load_classifier(DIR)` reads a fine-tuning run: its model config and labels from config.json, the
parameters of its best checkpoint (DIR/best/) or else its newest one, and the run's tokenizer (that of its
backbone, checked against the hash the run recorded); or an HF GPT2ForSequenceClassification directory
(cgpt_jax/interop/hf.py) with its tokenizer. `Classifier.predict` tokenizes like training
(truncated to the run's max_len, padded on the right) and scores the texts in batches of one length
bucket each, so the jitted forward compiles once per bucket. `load_classifier(DIR, scheme)` quantizes
the classifier's weights after loading (cgpt_jax/quantize); DIR may also be a quantized classifier
checkpoint (`python -m cgpt_jax.quantize --checkpoint=RUN`), loaded as saved.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from cgpt_jax import peft, quantize, run_dir, storage
from cgpt_jax.data.tokenizer import TextTokenizer
from cgpt_jax.errors import InputError
from cgpt_jax.finetune import backbone as backbones
from cgpt_jax.finetune.data import length_batches, tokenize
from cgpt_jax.finetune.model import SequenceClassifier
from cgpt_jax.interop import hf
from cgpt_jax.peft import training as peft_training
from cgpt_jax.train import checkpoint

Forward = Callable[[np.ndarray, np.ndarray], jax.Array]  # (tokens [B, L], lengths [B]) → class logits [B, C]


def batched_logits(forward: Forward, tokens_NxL: np.ndarray, lengths_N: np.ndarray, batch_size: int) -> np.ndarray:
    """Class logits [N, C] of every row, computed `batch_size` rows of one length bucket at a time (cut to
    the bucket's length; a short batch is filled with copies of its first row), so that a jitted `forward`
    compiles once per bucket."""
    logits_NxC = None
    for rows, length in length_batches(lengths_N, batch_size, tokens_NxL.shape[1]):
        filled = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        logits_BxC = np.asarray(jax.device_get(forward(tokens_NxL[filled, :length], lengths_N[filled])))
        if logits_NxC is None:
            logits_NxC = np.empty((len(lengths_N), logits_BxC.shape[1]), logits_BxC.dtype)
        logits_NxC[rows] = logits_BxC[:len(rows)]
    return logits_NxC


def probabilities(logits_NxC: np.ndarray, loss: str) -> np.ndarray:
    """What the training loss makes of the logits: a softmax over the classes, or each class's sigmoid."""
    if loss == "sigmoid":
        return np.asarray(jax.nn.sigmoid(logits_NxC))
    return np.asarray(jax.nn.softmax(logits_NxC, axis=-1))


@nnx.jit
def _class_logits(model: SequenceClassifier, tokens_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
    return model(tokens_BxL, lengths_B)


@dataclasses.dataclass(frozen=True)
class Classifier:
    model: SequenceClassifier
    tokenizer: TextTokenizer
    label_names: list[str]
    loss: str  # 'softmax' | 'sigmoid', as trained
    max_len: int  # longer texts are cut to their first max_len tokens (a run's train.seq_len)
    source: str  # the checkpoint ('DIR/checkpoints/STEP') or HF directory the parameters came from
    multi_label: bool = False  # trained on label sets: each label whose sigmoid is >= 0.5 applies
    method: str = "full"  # the PEFT method whose parameters `model` holds ('full': none; LoRA is merged)

    def head(self) -> quantize.ClassifierHead:
        """What a quantized checkpoint of this classifier records beside its weights."""
        return quantize.ClassifierHead(self.model.num_labels, self.label_names, self.loss, self.max_len,
                                       self.multi_label, self.method)

    def forward(self, tokens_BxL: np.ndarray, lengths_B: np.ndarray) -> jax.Array:
        """Class logits [B, C]; jitted, so one compile per (B, L)."""
        return _class_logits(self.model, jnp.asarray(tokens_BxL, jnp.int32), jnp.asarray(lengths_B, jnp.int32))

    def predict(self, texts: list[str], batch_size: int) -> tuple[np.ndarray, int]:
        """(probabilities [N, C], how many texts were truncated)."""
        tokens_NxL, lengths_N, truncated = tokenize(texts, self.tokenizer, self.max_len)
        if not lengths_N.all():
            empty = int(np.flatnonzero(lengths_N == 0)[0])
            raise InputError(f"text {empty + 1} ({texts[empty]!r}) has no tokens — give it some text")
        return probabilities(batched_logits(self.forward, tokens_NxL, lengths_N, batch_size), self.loss), truncated


def _read_run_config(directory: storage.Path) -> dict:
    config_file = directory / run_dir.CONFIG
    if not config_file.is_file():
        raise InputError(f"--checkpoint={directory}: {config_file} is not there — give the directory of a "
                         f"fine-tuning run (what python -m cgpt_jax.finetune --workdir=... writes)")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if raw.get("finetune", {}).get("num_labels", -1) == -1 or "label_names" not in raw.get("data_description", {}):
        raise InputError(f"--checkpoint={directory}: {config_file} is not a fine-tuning run's (no "
                         f"finetune.num_labels or label names) — a language model generates text: "
                         f"python -m cgpt_jax.generate --checkpoint={directory}")
    return raw


def _checkpoint_directory(directory: storage.Path) -> storage.Path:
    """DIR/best when it holds a complete checkpoint (the state with the best validation metric), else DIR."""
    best = directory / run_dir.BEST
    return best if checkpoint.scan(str(best / run_dir.CHECKPOINTS))[0] else directory


def _hf_classifier(directory: storage.Path) -> Classifier:
    with hf.local_directory(directory) as local:  # a bucket's directory: downloaded once for both readers
        imported = hf.classifier_from_pretrained(local)
        tokenizer = backbones.load_backbone(backbones.HF_PREFIX + str(local)).tokenizer
    return Classifier(imported.model, tokenizer, imported.label_names, imported.config.finetune.loss,
                      imported.config.model.max_seq_len, str(directory))


def is_classifier(directory: storage.Path) -> bool:
    """Whether `directory` holds a classifier: a fine-tuning run with labels, or an HF directory of a
    ...ForSequenceClassification model (other directories are language models or not models at all)."""
    config_file = directory / run_dir.CONFIG
    if not config_file.is_file():
        return False
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if "model_type" in raw:
        return any(name.endswith("ForSequenceClassification") for name in raw.get("architectures") or [])
    return raw.get("finetune", {}).get("num_labels", -1) != -1


def load_classifier(path: str, scheme: quantize.Scheme | None = None) -> Classifier:
    """A fine-tuning run's classifier (see the module docstring), an HF GPT2ForSequenceClassification
    directory's or a quantized classifier checkpoint's, on the first device; its weights quantized with
    `scheme` when given (a quantized checkpoint must have been written with it). `path` may be local, gs://
    or s3://."""
    if quantize.is_checkpoint(storage.path(path)):
        return _load_quantized_classifier(storage.path(path), scheme)
    classifier = _load_float_classifier(storage.path(path))
    if scheme is None:
        return classifier
    return dataclasses.replace(classifier, model=quantize.apply(classifier.model, scheme))


def _load_quantized_classifier(directory: storage.Path, scheme: quantize.Scheme | None) -> Classifier:
    saved = quantize.load(directory, scheme=scheme)
    if saved.classifier is None:
        raise InputError(f"--checkpoint={directory} is a quantized language model, not a classifier — it "
                         f"generates text: python -m cgpt_jax.generate --checkpoint={directory}")
    head = saved.classifier
    tokenizer = TextTokenizer(saved.tokenizer, str(directory / quantize.checkpoint.TOKENIZER))
    return Classifier(saved.model, tokenizer, head.label_names, head.loss, head.max_len, str(directory),
                      multi_label=head.multi_label, method=head.method)


def _load_float_classifier(directory: storage.Path) -> Classifier:
    config_file = directory / run_dir.CONFIG
    if config_file.is_file() and "model_type" in json.loads(config_file.read_text(encoding="utf-8")):
        return _hf_classifier(directory)
    raw = _read_run_config(directory)
    description = raw["data_description"]
    tokenizer = backbones.load_backbone(description["backbone"]).tokenizer
    if tokenizer.sha256 != description["tokenizer"]["sha256"]:
        raise InputError(f"--checkpoint={directory}: the tokenizer of its backbone {description['backbone']} is "
                         f"not the one the run was trained with (sha256 differs) — restore the backbone's "
                         f"tokenizer as it was when the run was fine-tuned")
    model_cfg = ml_collections.ConfigDict(raw["model"])
    num_labels = raw["finetune"]["num_labels"]
    method = raw["finetune"].get("method", "full")  # a PEFT run's checkpoints hold its method's parameters
    graphdef, abstract = nnx.split(peft_training.abstract_with_method(
        lambda: SequenceClassifier(model_cfg, num_labels, rngs=nnx.Rngs(0)), method, model_cfg), nnx.Param)
    device = SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    try:
        source = checkpoint.find_init_source(str(_checkpoint_directory(directory)),
                                             checkpoint.tensor_specs(abstract, "params/"), flag="--checkpoint")
    except ValueError as e:  # the message names the directory and the fix
        raise InputError(str(e)) from None
    model = nnx.merge(graphdef, checkpoint.load_init_params(source, like))
    if model.peft is not None and peft.build(method).mergeable:
        model = peft_training.merge(model)  # LoRA folded in: the base model's forward pass and speed
    return Classifier(model, tokenizer, list(description["label_names"]), raw["finetune"]["loss"],
                      raw["train"]["seq_len"], str(storage.path(source.directory, str(source.step))),
                      multi_label=bool(description.get("multi_label", False)),
                      method=method if model.peft is not None else "full")
