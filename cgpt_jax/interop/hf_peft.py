"""LoRA adapters in the Hugging Face PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

    save_adapter(model, DIR)   our GPT / SequenceClassifier with `lora` attached → a directory that
                               `peft.PeftModel.from_pretrained(base, DIR)` loads onto transformers'
                               GPT2LMHeadModel (task CAUSAL_LM) or GPT2ForSequenceClassification (SEQ_CLS:
                               the trained `score` head goes with it, as PEFT's modules_to_save)
    load_adapter(model, DIR)   a PEFT LoRA directory (made by `peft` itself or by save_adapter) attached to
                               our model of the same base: the same spec string as config.finetune.method

Layouts: GPT-2's Conv1D weights are (in, out), so PEFT stores them with fan_in_fan_out=True and its update
is (B·A)ᵀ·scaling with lora_A [rank, in] and lora_B [out, rank]; ours is A·B·(alpha/rank) with A [in, rank],
B [rank, out], so lora_A = Aᵀ and lora_B = Bᵀ per layer. Module names: qkv → attn.c_attn, out →
attn.c_proj, up → mlp.c_fc, down → mlp.c_proj (PEFT's `c_proj` alone names both projections, so the
exported target_modules is a regular expression over full module names). Only plain LoRA is read:
rsLoRA, DoRA, per-module ranks and LoRA on other modules are refused with the reason.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load, save

from cgpt_jax import storage
from cgpt_jax.errors import InputError
from cgpt_jax.peft import build, spec_string
from cgpt_jax.peft.base import HEAD
from cgpt_jax.peft.training import attach

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
HF_MODULES = {"qkv": "attn.c_attn", "out": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                  r"\.lora_([AB])\.weight$")


class AdapterFormatError(InputError):
    """A PEFT directory this model cannot use; the message names the file or field and the fix."""


def _lora(model: nnx.Module):
    lora = getattr(model.peft, "lora", None) if model.peft is not None else None
    if lora is None:
        raise ValueError("save_adapter: the model has no LoRA attached (config.finetune.method='lora(...)')")
    return lora


def save_adapter(model: nnx.Module, directory: str | os.PathLike, *, base_model_name_or_path: str = "") -> None:
    """Write the model's LoRA (and a classifier's head) in the HF PEFT format (see the module docstring)."""
    lora = _lora(model)
    tensors: dict[str, np.ndarray] = {}
    rank = None
    for target in lora.targets:
        a, b = (np.asarray(jax.device_get(getattr(lora, f"{target}_{x}")[...]), np.float32) for x in "ab")
        layers, rank = a.shape[0], a.shape[-1]
        for i in range(layers):
            key = f"{_PREFIX}transformer.h.{i}.{HF_MODULES[target]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    is_classifier = getattr(model, HEAD, None) is not None
    if is_classifier:  # PEFT's modules_to_save: the trained head replaces the base's
        tensors[f"{_PREFIX}{HEAD}.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(model.score[...])).T)
    modules = "|".join(re.escape(HF_MODULES[t]) for t in lora.targets)
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if is_classifier else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "r": rank, "lora_alpha": lora.scale * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": rf".*\.h\.\d+\.({modules})", "fan_in_fan_out": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": [HEAD] if is_classifier else None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    path = storage.path(directory)  # local, gs:// or s3://: the files are small, written as bytes
    path.mkdir(parents=True, exist_ok=True)
    storage.write_atomically(path / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    storage.write_atomically(path / CONFIG, json.dumps(config, indent=2))


def read_adapter(directory: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """(the method spec, e.g. "lora(rank=8, alpha=16, targets='qkv|out')", the weights by PEFT name)."""
    path = storage.path(directory)
    config_file, weights_file = path / CONFIG, path / WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise AdapterFormatError(f"{f}: not there — point at a directory written by PEFT's save_pretrained")
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    refused = {"peft_type": cfg.get("peft_type") != "LORA", "use_rslora": bool(cfg.get("use_rslora")),
               "use_dora": bool(cfg.get("use_dora")), "rank_pattern": bool(cfg.get("rank_pattern")),
               "alpha_pattern": bool(cfg.get("alpha_pattern")), "bias": cfg.get("bias", "none") != "none"}
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise AdapterFormatError(f"{config_file}: {', '.join(f'{k}={cfg.get(k)!r}' for k in bad)} — only plain "
                                 f"LoRA (peft_type LORA, one rank and alpha, no bias training) can be imported")
    tensors = load(weights_file.read_bytes())
    found: dict[str, set[int]] = {}
    for name in tensors:
        match = _KEY.match(name.replace(".default.", "."))
        if match is None and name != f"{_PREFIX}{HEAD}.weight":
            raise AdapterFormatError(f"{weights_file}: tensor {name!r} is not LoRA on c_attn, c_proj or c_fc of "
                                     f"a GPT-2 block — adapt only those modules")
        if match is not None:
            found.setdefault(match.group(2), set()).add(int(match.group(1)))
    targets = [t for t, module in HF_MODULES.items() if module in found]
    if not targets:
        raise AdapterFormatError(f"{weights_file}: no LoRA weights of a GPT-2 block")
    alpha = cfg["lora_alpha"]
    spec = spec_string("lora", {"rank": int(cfg["r"]), "alpha": alpha, "targets": "|".join(targets)})
    return spec, {name.replace(".default.", "."): array for name, array in tensors.items()}


def load_adapter(model: nnx.Module, directory: str | os.PathLike) -> tuple[nnx.Module, str]:
    """`model` (the adapter's base, imported with cgpt_jax.interop.hf, no method attached) with the PEFT
    LoRA of `directory` attached (and a classifier's head replaced); returns (model, method spec)."""
    spec, tensors = read_adapter(directory)
    recipe = build(spec)
    cfg = model.cfg
    try:
        recipe.validate(cfg)
    except ValueError as e:
        raise AdapterFormatError(f"{directory}: {e}") from None
    attach(model, recipe, cfg, nnx.Rngs(params=0))
    lora = model.peft.lora
    for target in lora.targets:
        for x in "ab":
            param = getattr(lora, f"{target}_{x}")
            layers = []
            for i in range(cfg.n_layers):
                name = f"{_PREFIX}transformer.h.{i}.{HF_MODULES[target]}.lora_{x.upper()}.weight"
                if name not in tensors:
                    raise AdapterFormatError(f"{directory}: {name} is missing — the adapter must cover every layer")
                layers.append(tensors.pop(name).T)  # PEFT's [rank, in] / [out, rank] → ours [in, rank] / [rank, out]
            value = np.stack(layers).reshape(param.shape)
            param[...] = jnp.asarray(value, param[...].dtype)
    head = tensors.pop(f"{_PREFIX}{HEAD}.weight", None)
    if head is not None:
        if getattr(model, HEAD, None) is None or tuple(model.score.shape) != head.T.shape:
            raise AdapterFormatError(f"{directory}: it holds a classifier head of shape {head.shape}; load it onto "
                                     f"a classifier of {head.shape[0]} labels")
        model.score[...] = jnp.asarray(head.T, model.score[...].dtype)
    if tensors:
        raise AdapterFormatError(f"{directory}: {sorted(tensors)[:4]} do not fit this {cfg.n_layers}-layer model "
                                 f"— load the adapter onto the base it was trained on")
    return model, spec

