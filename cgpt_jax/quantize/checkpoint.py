"""Quantized checkpoints: written once from a float model, loaded without materialising float32 weights.

Layout of a quantized checkpoint directory:

    quantized.json   the scheme, the model config, where the weights came from (`source`: the float
                     checkpoint's path and the hash of its per-tensor fingerprint), the logical-axis rules,
                     the end-of-text ids, the quantized state's tensor specs and fingerprint; for a
                     fine-tuned classifier also `classifier` (`ClassifierHead`: its labels, loss, max_len
                     and the PEFT method whose parameters the weights hold)
    params/          the quantized nnx state (Orbax): integers, scales, and the weights kept float
    tokenizer.json   the source's tokenizer, when it has one

`load` builds the abstract model (a GPT, or a SequenceClassifier for a classifier), quantizes it abstractly (`jax.eval_shape`) to get the integer and scale
shapes, and restores straight into them on the target shardings; the restored state must match the
fingerprint taken when it was saved. Loading with another scheme or onto another model is refused.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from tokenizers import Tokenizer

from cgpt_jax import storage
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.model import SequenceClassifier
from cgpt_jax.model import GPT, abstract_model
from cgpt_jax.parallel.sharding import Rules, state_shardings
from cgpt_jax.peft.training import abstract_with_method
from cgpt_jax.quantize.model import quantize_state, weight_bytes
from cgpt_jax.quantize.scheme import Scheme, parse
from cgpt_jax.train.checkpoint import fingerprint, orbax_atomicity, tensor_specs

MANIFEST = "quantized.json"
PARAMS = "params"
TOKENIZER = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
    """What a quantized classifier checkpoint records beside its weights, for `classify` to use it."""
    num_labels: int
    label_names: list[str]
    loss: str  # 'softmax' | 'sigmoid', as trained
    max_len: int  # longer texts are cut to their first max_len tokens
    multi_label: bool
    method: str  # the PEFT method whose parameters the weights hold ('full': none; LoRA is merged first)


@dataclasses.dataclass(frozen=True)
class Loaded:
    model: GPT  # its weights are QuantizedArrays; a SequenceClassifier when `classifier` is set
    scheme: Scheme
    tokenizer: Tokenizer | None
    eos_ids: tuple[int, ...]
    rules: Rules
    source: dict[str, Any]
    classifier: ClassifierHead | None = None


def is_checkpoint(directory: str | storage.Path) -> bool:
    return storage.path(directory, MANIFEST).is_file()


def source_identity(path: str | storage.Path, float_state: nnx.State) -> dict[str, Any]:
    """Where a quantized model came from: the float checkpoint's path and a hash of its weights' bits."""
    digest = hashlib.sha256(json.dumps(fingerprint(float_state), sort_keys=True).encode()).hexdigest()
    return {"checkpoint": str(storage.path(path)), "float_fingerprint_sha256": digest}


def save(directory: str | storage.Path, model: GPT, scheme: Scheme, *, source: dict[str, Any],
         rules: Rules, tokenizer: Tokenizer | None = None, eos_ids: tuple[int, ...] = (),
         classifier: ClassifierHead | None = None) -> None:
    """Write the quantized `model` (from `quantize.apply(float_model, scheme)`) to a new directory; a
    classifier's `model` is its SequenceClassifier, described by `classifier`."""
    directory = storage.path(directory)  # absolute: Orbax takes absolute paths only
    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"{directory} is not empty — give a new directory for the quantized checkpoint")
    state = nnx.state(model)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer(atomicity_options=orbax_atomicity(str(directory))) as checkpointer:
        checkpointer.save(directory / PARAMS, state)
    if tokenizer is not None:
        storage.write_atomically(directory / TOKENIZER, tokenizer.to_str())
    manifest = {"scheme": scheme.name, "model": model.cfg.to_dict(), "source": source,
                "rules": [[name, axes] for name, axes in rules], "eos_ids": list(eos_ids),
                "weight_bytes": weight_bytes(state), "tensors": tensor_specs(state), "fingerprint": fingerprint(state)}
    if classifier is not None:
        manifest["classifier"] = dataclasses.asdict(classifier)
    storage.write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1))  # last: marks it complete


def read_manifest(directory: str | storage.Path) -> dict[str, Any]:
    path = storage.path(directory, MANIFEST)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the quantized checkpoint's manifest ({e}) — point at a directory "
                         f"written by python -m cgpt_jax.quantize") from e


def load(directory: str | storage.Path, *, scheme: Scheme | None = None,
         model_cfg: ml_collections.ConfigDict | None = None, mesh: Mesh | None = None) -> Loaded:
    """The quantized model of `directory`, on `mesh` (or the first device). `scheme` / `model_cfg`, when
    given, must be the checkpoint's: a mismatch is an InputError before anything is read."""
    directory = storage.path(directory)
    manifest = read_manifest(directory)
    saved_scheme = parse(manifest["scheme"])
    if scheme is not None and scheme != saved_scheme:
        raise InputError(f"{directory} holds a model quantized with {saved_scheme}; {scheme} was asked for — drop the scheme "
                         f"to use it as it is, or quantize the float model with {scheme}")
    cfg = ml_collections.ConfigDict(manifest["model"])
    if model_cfg is not None and model_cfg.to_dict() != manifest["model"]:
        differences = sorted(k for k in set(manifest["model"]) | set(model_cfg.to_dict())
                             if manifest["model"].get(k) != model_cfg.to_dict().get(k))
        raise InputError(f"{directory} holds another model (model.{', model.'.join(differences)} differ) — "
                         f"load it with its own config, or quantize this model")
    rules = [(name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in manifest["rules"]]
    classifier = ClassifierHead(**manifest["classifier"]) if "classifier" in manifest else None
    graphdef, abstract = nnx.split(_abstract(cfg, classifier))
    abstract = jax.eval_shape(functools.partial(quantize_state, scheme=saved_scheme), abstract)
    if mesh is not None:
        shardings = state_shardings(abstract, mesh, rules)
    else:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    if tensor_specs(target) != manifest["tensors"]:
        raise InputError(f"{directory}: the saved tensors do not fit the recorded model and scheme — the "
                         f"checkpoint was edited or written by another version; quantize the float model again")
    with ocp.StandardCheckpointer(atomicity_options=orbax_atomicity(str(directory))) as checkpointer:
        state = checkpointer.restore(directory / PARAMS, target)
    if fingerprint(state) != manifest["fingerprint"]:
        raise InputError(f"{directory}: the restored weights differ from the fingerprint taken when they were "
                         f"saved; the checkpoint is damaged — quantize the float model again")
    tokenizer_file = directory / TOKENIZER
    tokenizer = Tokenizer.from_str(tokenizer_file.read_text(encoding="utf-8")) if tokenizer_file.is_file() else None
    return Loaded(nnx.merge(graphdef, state), saved_scheme, tokenizer, tuple(manifest["eos_ids"]), rules,
                  manifest["source"], classifier)


def _abstract(cfg: ml_collections.ConfigDict, classifier: ClassifierHead | None) -> GPT:
    """The float model the checkpoint was quantized from, shapes only."""
    if classifier is None:
        return abstract_model(cfg)
    return abstract_with_method(lambda: SequenceClassifier(cfg, classifier.num_labels, rngs=nnx.Rngs(0)),
                                classifier.method, cfg)
