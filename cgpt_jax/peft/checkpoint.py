"""A fine-tuned method's checkpoint: only the trained parameters, plus the identity of the base they fit.

    DIR/adapter.safetensors   the trainable parameters (the method's and the task head's), by path name
    DIR/adapter.json          {"method": spec, "base": {"path": ..., "sha256": ...}, "tensors": {name: [shape, dtype]}}

The base's sha256 covers the name, shape, dtype and bytes of every frozen parameter, so `load` refuses a
base that is not the one trained on (another run, another step, another size) before anything is replaced.
DIR may be local, gs:// or s3:// (the files are small: written and read as bytes, no local copy).
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from flax import nnx
import safetensors.numpy

from cgpt_jax import storage
from cgpt_jax.errors import InputError
from cgpt_jax.peft import build
from cgpt_jax.peft.training import split_trainable

TENSORS = "adapter.safetensors"
META = "adapter.json"


class AdapterError(InputError):
    """An adapter directory that does not fit the model it is loaded onto."""


def _named(params: nnx.State) -> dict[str, np.ndarray]:
    return {"/".join(str(p) for p in path): np.asarray(jax.device_get(v[...]))
            for path, v in nnx.to_flat_state(params)}


def base_sha256(params: nnx.State, spec: str) -> str:
    """Hash of the frozen parameters of `params` under method `spec` (names, shapes, dtypes, bytes)."""
    _, frozen = split_trainable(build(spec), params)
    digest = hashlib.sha256()
    for name, array in sorted(_named(frozen).items()):
        digest.update(f"{name}:{array.shape}:{array.dtype}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save(directory: str, spec: str, params: nnx.State, base_path: str) -> dict:
    """Write the trainable parameters of `params` and the base's identity; returns adapter.json's content."""
    trainable, _ = split_trainable(build(spec), params)
    tensors = _named(trainable)
    meta = {"method": spec, "base": {"path": base_path, "sha256": base_sha256(params, spec)},
            "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(tensors.items())}}
    storage.path(directory).mkdir(parents=True, exist_ok=True)
    storage.write_atomically(storage.path(directory, TENSORS), safetensors.numpy.save(tensors))
    storage.write_atomically(storage.path(directory, META), json.dumps(meta, indent=1))  # last: names the tensors
    return meta


def load(directory: str, params: nnx.State) -> nnx.State:
    """`params` (a base with the method's parameters attached, any values) with the adapter's tensors in
    place; AdapterError when the base or the shapes differ from the ones it was trained with."""
    meta_file = storage.path(directory, META)
    if not meta_file.is_file():
        raise AdapterError(f"{directory}: no {META} — point at a directory written by cgpt_jax.peft.checkpoint.save")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    spec = meta["method"]
    found = base_sha256(params, spec)
    if found != meta["base"]["sha256"]:
        raise AdapterError(f"{directory}: trained on the base {meta['base']['path']} (sha256 "
                           f"{meta['base']['sha256'][:12]}…), but this base's parameters hash to {found[:12]}… — "
                           f"load it onto the base it was trained on")
    tensors = safetensors.numpy.load(storage.path(directory, TENSORS).read_bytes())
    flat = []
    for path, v in nnx.to_flat_state(params):
        name = "/".join(str(p) for p in path)
        if name in tensors:
            if tuple(tensors[name].shape) != tuple(v.shape):
                raise AdapterError(f"{directory}: {name} has shape {tensors[name].shape}, the model's is {v.shape} "
                                   f"— build the model with method {spec!r} as trained")
            value = tensors.pop(name).astype(v[...].dtype)
            sharding = getattr(v[...], "sharding", None)  # jax arrays stay where they were; numpy stays host
            v = v.replace(value if sharding is None else jax.device_put(value, sharding))
        flat.append((path, v))
    if tensors:
        raise AdapterError(f"{directory}: the model has no parameter(s) {sorted(tensors)[:6]} — build it with "
                           f"method {spec!r} (config.finetune.method) as trained")
    return nnx.from_flat_state(flat)

