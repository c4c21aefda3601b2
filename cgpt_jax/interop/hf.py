"""Hugging Face GPT-2 / Cerebras-GPT checkpoints: import into our `GPT`, export back.

`from_pretrained(dir)` reads a local HF model directory: `config.json` (model_type 'gpt2',
architectures GPT2LMHeadModel, or GPT2Model as in the Cerebras-GPT-13B repo; or model_type 'btlm', the
Cerebras-GPT-muP checkpoints of cerebras/Cerebras-GPT-Intermediate, whose `mup_*` fields become our muP
config) plus the weights as
`model.safetensors`, `pytorch_model.bin` or their sharded `*.index.json` forms. `.bin` files go through
`torch.load(weights_only=True)`, which refuses anything but tensors, so no code is ever unpickled.
Every parameter is built with `jax.make_array_from_callback` from slices of the memory-mapped files, so
on a mesh each device receives only its own shard and no host holds the whole model.

`save_pretrained(model, dir)` writes `config.json` + `model.safetensors` that `transformers` loads as
GPT2LMHeadModel (a muP model is written as BTLM, which transformers loads only with Cerebras's remote
code); import → export → import is bit-exact.

Sequence classification: `classifier_from_pretrained(dir)` / `save_classifier(model, dir, label_names=...)`
read and write `GPT2ForSequenceClassification` (the decoder plus `score.weight` [num_labels, d_model], no
bias; id2label/label2id, pad_token_id, problem_type) as our `finetune.model.SequenceClassifier`.
transformers pools each row at its last token that is not pad_token_id; ours at lengths - 1, so the two
agree on unpadded rows and on rows padded with a pad_token_id that the texts never contain.

Layouts: GPT-2's Conv1D weights are stored (in, out) like our kernels, so the mapping is reshapes only:
c_attn (d, 3d) = qkv_kernel (d, 3, h, k) per layer, attn.c_proj (d, d) = out_kernel (h, k, d), and so on.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from cgpt_jax import storage
from cgpt_jax.config import base_config, resolve
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.model import HEAD, SequenceClassifier
from cgpt_jax.model import GPT, abstract_model, attention, parameterization
from cgpt_jax.parallel.sharding import DEFAULT_RULES, Rules, state_shardings

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# model_type -> accepted architectures. GPT2Model: the 13B repo's config.json (errata). BTLM (Cerebras's
# GPT-2 with muP multipliers, ALiBi and SwiGLU options) stores GPT-2's tensors under GPT-2's names.
ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"), "btlm": ("BTLMLMHeadModel", "BTLMModel")}
CLASSIFIER = "GPT2ForSequenceClassification"  # the decoder + `score` [num_labels, d_model], no bias
CLASSIFIER_ARCHITECTURES = {"gpt2": (CLASSIFIER,)}

# GPT2Config's defaults, which transformers applies to keys missing from config.json.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
    "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256,
}
# BTLMConfig's additional defaults (SP values: without them a BTLM config is a GPT-2).
_BTLM_DEFAULTS: dict[str, Any] = {
    "position_embedding_type": "learned", "mup_width_scale": 1.0, "mup_embeddings_scale": 1.0,
    "mup_output_alpha": 1.0, "mup_scale_qk_dot_by_d": False, "alibi_scaling": None,
}
# What our decoder computes; a config asking for anything else would import with different outputs.
_REQUIRED = {
    "activation_function": "gelu",  # exact erf GELU, as Cerebras-GPT ('gelu_new' is GPT-2's tanh approximation)
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
_BTLM_REQUIRED = {
    "position_embedding_type": "learned",  # 'alibi' BTLMs (btlm-3b-8k) use slopes and SwiGLU we do not import
    "mup_output_alpha": 1.0,  # Cerebras-GPT-muP: logits times mup_width_scale alone
    "alibi_scaling": None,
}

# Our parameter path → HF tensor name (after dropping a 'transformer.' prefix); per-layer ones under h.{i}.
_GLOBAL_NAMES = {"wte": "wte.weight", "wpe": "wpe.weight", "ln_f/scale": "ln_f.weight", "ln_f/bias": "ln_f.bias"}
_LAYER_NAMES = {
    "blocks/ln_attn/scale": "ln_1.weight",
    "blocks/ln_attn/bias": "ln_1.bias",
    "blocks/attn/qkv_kernel": "attn.c_attn.weight",
    "blocks/attn/qkv_bias": "attn.c_attn.bias",
    "blocks/attn/out_kernel": "attn.c_proj.weight",
    "blocks/attn/out_bias": "attn.c_proj.bias",
    "blocks/ln_mlp/scale": "ln_2.weight",
    "blocks/ln_mlp/bias": "ln_2.bias",
    "blocks/mlp/up_kernel": "mlp.c_fc.weight",
    "blocks/mlp/up_bias": "mlp.c_fc.bias",
    "blocks/mlp/down_kernel": "mlp.c_proj.weight",
    "blocks/mlp/down_bias": "mlp.c_proj.bias",
}
# Causal-mask buffers that old GPT-2 checkpoints carry; not parameters.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LM_HEAD = "lm_head.weight"
_SCORE = "score.weight"

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
_TORCH_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class HFCheckpointError(InputError):
    """A directory or file that is not a usable GPT-2-family checkpoint; the message says what is wrong."""


class Pretrained(NamedTuple):
    model: GPT  # int32 tokens [B, L] → float32 logits [B, L, V_padded]
    config: ml_collections.ConfigDict  # a full, resolved project config whose `model` matches the weights
    tokenizer: Tokenizer | None  # from tokenizer.json or vocab.json + merges.txt in the directory, if any
    eos_token_ids: tuple[int, ...]  # config.json's eos_token_id (GPT2Config's default 50256 when absent)


# --- buckets ------------------------------------------------------------------------------------

@contextlib.contextmanager
def local_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """`path` as a local directory: itself, or for gs:// / s3:// a temporary local copy of its files (deleted
    on exit), since safetensors memory-maps local files and tokenizers reads local files only."""
    if not storage.is_remote(path):
        yield pathlib.Path(path)
        return
    source = storage.path(path)
    if not source.is_dir():
        raise HFCheckpointError(f"{path} is not a directory; expected a Hugging Face model directory "
                                f"with {CONFIG_FILE} and {SAFETENSORS_FILE} (or {TORCH_FILE})")
    with tempfile.TemporaryDirectory(prefix="cgpt_jax-hf-") as tmp:
        for item in source.iterdir():
            if item.is_file():
                with item.open("rb") as remote, open(os.path.join(tmp, item.name), "wb") as local:
                    shutil.copyfileobj(remote, local)
        yield pathlib.Path(tmp)


def _upload(local: pathlib.Path, target: str | os.PathLike) -> None:
    """Copy a local directory's files to `target` (gs:// or s3://), config.json last: a reader that finds
    it finds the weights too."""
    files = sorted(local.iterdir(), key=lambda f: f.name == CONFIG_FILE)
    for item in files:
        with open(item, "rb") as source, storage.path(target, item.name).open("wb") as remote:
            shutil.copyfileobj(source, remote)


# --- config --------------------------------------------------------------------------------------

def read_hf_config(directory: str | os.PathLike,
                   architectures: dict[str, tuple[str, ...]] = ARCHITECTURES) -> dict[str, Any]:
    """config.json of an HF model directory, checked to describe a GPT-2 (or BTLM) our decoder computes,
    as one of `architectures` (by model_type)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise HFCheckpointError(f"{directory} is not a directory; expected a Hugging Face model directory "
                                f"with {CONFIG_FILE} and {SAFETENSORS_FILE} (or {TORCH_FILE})")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise HFCheckpointError(f"{directory} has no {CONFIG_FILE}; found {_listing(directory)}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise HFCheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object")
    model_type = raw.get("model_type")
    if model_type not in architectures:
        raise HFCheckpointError(f"{path}: model_type={model_type!r}; only GPT-2-family models (model_type "
                                f"{' or '.join(map(repr, architectures))}) can be imported here")
    unknown = [a for a in raw.get("architectures") or [] if a not in architectures[model_type]]
    if unknown:
        raise HFCheckpointError(f"{path}: architectures {unknown} are not supported here; expected one of "
                                f"{list(architectures[model_type])} (a {CLASSIFIER} directory is read by "
                                f"classifier_from_pretrained, a language model's by from_pretrained)")
    is_btlm = model_type == "btlm"
    full = {**_HF_DEFAULTS, **(_BTLM_DEFAULTS if is_btlm else {}), **raw}
    required = {**_REQUIRED, **(_BTLM_REQUIRED if is_btlm else {})}
    errors = [f"{key}={full[key]!r} (our decoder computes {key}={want!r})"
              for key, want in required.items() if full[key] != want]
    if is_btlm:
        errors += _mup_errors(full)
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if not isinstance(full[key], int) or full[key] <= 0:
            errors.append(f"{key}={full[key]!r} must be a positive integer")
    if full["n_inner"] is not None and (not isinstance(full["n_inner"], int) or full["n_inner"] <= 0):
        errors.append(f"n_inner={full['n_inner']!r} must be a positive integer or null")
    if not errors and full["n_embd"] % full["n_head"]:
        errors.append(f"n_head={full['n_head']} does not divide n_embd={full['n_embd']}")
    if errors:
        raise HFCheckpointError(f"{path} describes a model we cannot import exactly:\n- " + "\n- ".join(errors))
    return full


def _mup_errors(full: dict[str, Any]) -> list[str]:
    """What keeps a BTLM config's mup_* fields from mapping onto our SP or muP."""
    errors = []
    for key in ("mup_width_scale", "mup_embeddings_scale"):
        if isinstance(full[key], bool) or not isinstance(full[key], (int, float)) or not full[key] > 0:
            errors.append(f"{key}={full[key]!r} must be a positive number")
    if not isinstance(full["mup_scale_qk_dot_by_d"], bool):
        errors.append(f"mup_scale_qk_dot_by_d={full['mup_scale_qk_dot_by_d']!r} must be true or false")
    if errors or not _is_mup(full):
        return errors
    if not full["mup_scale_qk_dot_by_d"]:
        return [f"mup_width_scale={full['mup_width_scale']!r} and mup_embeddings_scale="
                f"{full['mup_embeddings_scale']!r} with mup_scale_qk_dot_by_d=false: our muP always scales "
                f"attention by 1/d_head (Cerebras-GPT-muP sets it true)"]
    d_ff = full["n_inner"] if full["n_inner"] is not None else 4 * full["n_embd"]
    for key, width in (("n_embd", full["n_embd"]), ("n_inner", d_ff)):
        if isinstance(width, int) and _base_width(width, full["mup_width_scale"]) is None:
            errors.append(f"{key}={width} times mup_width_scale={full['mup_width_scale']!r} is not a whole base "
                          f"width (mup_base_d_model / mup_base_d_ff must be integers)")
    return errors


def _is_mup(hf_cfg: dict[str, Any]) -> bool:
    return hf_cfg.get("model_type") == "btlm" and any(
        hf_cfg[key] != _BTLM_DEFAULTS[key] for key in ("mup_width_scale", "mup_embeddings_scale",
                                                       "mup_scale_qk_dot_by_d"))


def _base_width(width: int, width_scale: float) -> int | None:
    """width · width_scale as an integer, or None when it is not one (to 1e-9 relative)."""
    base = round(width * width_scale)
    return base if base > 0 and abs(base - width * width_scale) <= 1e-9 * width * width_scale else None


def config_from_hf(hf_cfg: dict[str, Any], *, param_dtype: str = "float32", compute_dtype: str = "float32",
                   vocab_pad_multiple: int = 1) -> ml_collections.ConfigDict:
    """A full project config (base_config() with the model taken from a checked HF config dict).

    A BTLM config with muP multipliers gives `model.parameterization = 'mup'` with mup_base_d_model =
    n_embd · mup_width_scale (so the logits are multiplied by mup_width_scale), the same base fraction of
    d_ff, and mup_embedding_multiplier = mup_embeddings_scale; `init_std` is its initializer_range, which
    under muP is the base init std."""
    c = base_config()
    m = c.model
    m.vocab_size = hf_cfg["vocab_size"]
    m.vocab_pad_multiple = vocab_pad_multiple
    m.d_model = hf_cfg["n_embd"]
    m.n_layers = hf_cfg["n_layer"]
    m.n_heads = hf_cfg["n_head"]
    m.d_ff = hf_cfg["n_inner"] if hf_cfg["n_inner"] is not None else 4 * hf_cfg["n_embd"]
    m.max_seq_len = hf_cfg["n_positions"]
    m.attention = "dense"
    m.layer_norm_eps = float(hf_cfg["layer_norm_epsilon"])
    m.init_std = float(hf_cfg["initializer_range"])
    if _is_mup(hf_cfg):
        m.parameterization = "mup"
        m.mup_base_d_model = _base_width(m.d_model, hf_cfg["mup_width_scale"])
        m.mup_base_d_ff = _base_width(m.d_ff, hf_cfg["mup_width_scale"])
        m.mup_embedding_multiplier = float(hf_cfg["mup_embeddings_scale"])
    m.param_dtype = param_dtype
    m.compute_dtype = compute_dtype
    c.train.seq_len = min(c.train.seq_len, m.max_seq_len)
    return resolve(c)


def hf_config_dict(model_cfg: ml_collections.ConfigDict, *, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json for our model config, as GPT2LMHeadModel (Cerebras-GPT's settings, no dropout), or
    for a muP model as BTLMLMHeadModel with its mup_* fields (Cerebras-GPT-muP's format)."""
    attention.build(model_cfg.attention)  # a malformed spec gets the registry's own error
    if model_cfg.attention.replace(" ", "") not in ("dense", "dense()"):
        raise HFCheckpointError(f"model.attention={model_cfg.attention!r} has no GPT-2 equivalent; only "
                                "'dense' attention can be exported")
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model_cfg.vocab_size,
        "n_positions": model_cfg.max_seq_len,
        "n_embd": model_cfg.d_model,
        "n_layer": model_cfg.n_layers,
        "n_head": model_cfg.n_heads,
        "n_inner": model_cfg.d_ff,
        "activation_function": "gelu",
        "layer_norm_epsilon": model_cfg.layer_norm_eps,
        "initializer_range": model_cfg.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": str(jnp.dtype(model_cfg.param_dtype)),
    }
    if parameterization.is_mup(model_cfg):
        m_width, m_ff = parameterization.width_multiplier(model_cfg), parameterization.ff_width_multiplier(model_cfg)
        if not math.isclose(m_width, m_ff, rel_tol=1e-12):
            raise HFCheckpointError(f"model.d_ff / model.mup_base_d_ff = {m_ff:g} differs from model.d_model / "
                                    f"model.mup_base_d_model = {m_width:g}; BTLM's config has one width scale, "
                                    f"so only models with equal multipliers can be exported")
        config.update(architectures=["BTLMLMHeadModel"], model_type="btlm", position_embedding_type="learned",
                      mup_width_scale=parameterization.output_logits_multiplier(model_cfg),
                      mup_embeddings_scale=parameterization.embedding_multiplier(model_cfg),
                      mup_output_alpha=1.0, mup_scale_qk_dot_by_d=True)
    return config


def hf_tensor_shapes(model_cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT2Model state dict (no 'transformer.' prefix) with its shape."""
    d, ff, V, S = model_cfg.d_model, model_cfg.d_ff, model_cfg.vocab_size, model_cfg.max_seq_len
    per_layer = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d),
                 "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                 "ln_2.weight": (d,), "ln_2.bias": (d,), "mlp.c_fc.weight": (d, ff), "mlp.c_fc.bias": (ff,),
                 "mlp.c_proj.weight": (ff, d), "mlp.c_proj.bias": (d,)}
    shapes = {"wte.weight": (V, d), "wpe.weight": (S, d)}
    for i in range(model_cfg.n_layers):
        shapes.update({f"h.{i}.{name}": shape for name, shape in per_layer.items()})
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


# --- reading weights -----------------------------------------------------------------------------

def _listing(directory: pathlib.Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return "nothing" if not names else ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint files, preferring safetensors; sharded checkpoints are listed by their index."""
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (TORCH_FILE, TORCH_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise HFCheckpointError(f"{directory / index} is not an index with a 'weight_map' object ({e})")
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise HFCheckpointError(f"{directory / index} lists files that are missing: {missing}")
            return [directory / f for f in files]
    raise HFCheckpointError(f"{directory} has no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
                            f"{TORCH_FILE} or {TORCH_INDEX}; found {_listing(directory)}")


def _torch_state_dict(path: pathlib.Path) -> dict[str, Any]:
    """A .bin state dict via torch.load(weights_only=True): tensors only, memory-mapped when possible."""
    try:
        import torch
    except ImportError:
        raise HFCheckpointError(f"{path} is a PyTorch file and reading it needs torch (pip install "
                                f"'cgpt_jax[torch]'), or convert the checkpoint to {SAFETENSORS_FILE}") from None
    try:
        # mmap needs the zip format (torch ≥ 1.6); older files are read whole.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        detail = [line for line in str(e).splitlines() if re.search(r"GLOBAL|Unsupported|invalid load key", line)]
        raise HFCheckpointError(
            f"refusing {path}: torch.load(weights_only=True) rejected it, so it is not a plain state dict of "
            f"tensors and reading it would need unpickling of code or other objects"
            + (f" ({detail[0].strip()})" if detail else "") +
            f". Convert it to {SAFETENSORS_FILE} where you trust its origin.") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise HFCheckpointError(f"{path} is not a readable PyTorch checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HFCheckpointError(f"{path} does not hold a flat state dict of tensors")
    return state


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.contiguous().view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.contiguous().numpy()


class _Tensors:
    """A checkpoint's tensors by name ('transformer.' prefix dropped), read slice by slice from mapped files."""

    def __init__(self, directory: pathlib.Path):
        self.files = _weight_files(directory)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._readers: dict[str, Callable[[tuple[slice, ...]], np.ndarray]] = {}
        self._stack = contextlib.ExitStack()
        for path in self.files:
            if path.name.endswith(".safetensors"):
                self._add_safetensors(path)
            else:
                self._add_torch(path)

    def _add(self, raw_name: str, path: pathlib.Path, shape: tuple[int, ...], dtype: str,
             read: Callable[[tuple[slice, ...]], np.ndarray]) -> None:
        name = raw_name.removeprefix("transformer.")
        if name in self.shapes:
            raise HFCheckpointError(f"tensor {name!r} appears twice in the checkpoint (second time as "
                                    f"{raw_name!r} in {path.name})")
        self.shapes[name], self.dtypes[name], self._readers[name] = shape, dtype, read

    def _add_safetensors(self, path: pathlib.Path) -> None:
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            for key in handle.keys():
                view = handle.get_slice(key)
                self._add(key, path, tuple(view.get_shape()), view.get_dtype(),
                          lambda index, view=view: np.asarray(view[index]))
        except SafetensorError as e:
            raise HFCheckpointError(f"{path} is not a readable safetensors file: {e}") from None

    def _add_torch(self, path: pathlib.Path) -> None:
        for key, tensor in _torch_state_dict(path).items():
            dtype = _TORCH_DTYPE_NAMES.get(str(tensor.dtype).removeprefix("torch."), str(tensor.dtype))
            self._add(key, path, tuple(tensor.shape), dtype,
                      lambda index, tensor=tensor: _torch_to_numpy(tensor[index]))

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._readers[name](index)

    def close(self) -> None:
        self._stack.close()

    def check(self, expected: dict[str, tuple[int, ...]], source: str) -> None:
        """Every expected tensor present with its shape and a float dtype; nothing unexplained left over."""
        errors = []
        missing = [n for n in expected if n not in self.shapes]
        if missing:
            errors.append(f"missing tensors: {missing[:8]}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        for name, want in expected.items():
            if name in self.shapes and self.shapes[name] != want:
                errors.append(f"{name} has shape {self.shapes[name]} but config.json implies {want}")
            if name in self.dtypes and self.dtypes[name] not in _SAFETENSORS_DTYPES:
                errors.append(f"{name} has dtype {self.dtypes[name]}; expected a float ({list(_SAFETENSORS_DTYPES)})")
        unexpected = [n for n in self.shapes if n not in expected and n != _LM_HEAD and not _BUFFER.fullmatch(n)]
        if unexpected:
            errors.append(f"tensors that are not part of a GPT-2 language model: {unexpected[:8]}")
        if _LM_HEAD in self.shapes and self.shapes[_LM_HEAD] != expected["wte.weight"]:
            errors.append(f"{_LM_HEAD} has shape {self.shapes[_LM_HEAD]}, not the embedding's "
                          f"{expected['wte.weight']}")
        if errors:
            raise HFCheckpointError(f"the weights in {source} do not match its {CONFIG_FILE}:\n- " + "\n- ".join(errors))

    def check_tied_head(self, source: str, rows_per_chunk: int = 4096) -> None:
        """Our LM head is the embedding; an lm_head.weight stored beside it must equal it."""
        if _LM_HEAD not in self.shapes:
            return
        vocab, d = self.shapes[_LM_HEAD]
        for start in range(0, vocab, rows_per_chunk):
            rows = (slice(start, min(start + rows_per_chunk, vocab)), slice(0, d))
            if not np.array_equal(self.read(_LM_HEAD, rows), self.read("wte.weight", rows)):
                raise HFCheckpointError(f"{source}: {_LM_HEAD} differs from transformer.wte.weight (an untied "
                                        "LM head); our decoder ties the head to the embedding")


def _full_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """make_array_from_callback's index with Nones resolved to explicit bounds."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _read_as(tensors: _Tensors, name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """`index` of HF tensor `name` viewed with our per-layer `shape` (a reshape of the same elements).

    Slices are pushed into the file read where the layouts agree (whole tensor, or its first axis), so a
    device reading its shard of a (d, 3d) kernel touches only its rows.
    """
    hf_shape = tensors.shapes[name]
    if hf_shape == shape:
        return tensors.read(name, index)
    if hf_shape[0] == shape[0]:
        rows = tensors.read(name, (index[0],) + tuple(slice(0, n) for n in hf_shape[1:]))
        return rows.reshape((-1,) + shape[1:])[(slice(None),) + index[1:]]
    whole = tensors.read(name, tuple(slice(0, n) for n in hf_shape))
    return whole.reshape(shape)[index]


def _param_reader(path: str, tensors: _Tensors, shape: tuple[int, ...],
                  vocab_size: int) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """index into our parameter `path` of `shape` → those elements from the checkpoint."""
    if path == "wte":
        def read_wte(index: tuple[slice, ...]) -> np.ndarray:
            rows, cols = index
            real_rows = max(0, min(rows.stop, vocab_size) - rows.start)
            # Padding rows (vocab_pad_multiple) are zeros; their logits are masked to -inf anyway.
            padded = np.zeros((rows.stop - rows.start, cols.stop - cols.start), _SAFETENSORS_DTYPES[
                tensors.dtypes["wte.weight"]])
            if real_rows:
                padded[:real_rows] = tensors.read("wte.weight", (slice(rows.start, rows.start + real_rows), cols))
            return padded
        return read_wte
    if path in _GLOBAL_NAMES:
        return lambda index: _read_as(tensors, _GLOBAL_NAMES[path], shape, index)
    if path == HEAD:  # transformers' score.weight is [num_labels, d_model]; ours [d_model, num_labels]
        return lambda index: tensors.read(_SCORE, tuple(slice(0, n) for n in tensors.shapes[_SCORE])).T[index]
    if path in _LAYER_NAMES:
        def read_layers(index: tuple[slice, ...]) -> np.ndarray:
            layers, rest = index[0], index[1:]
            return np.stack([_read_as(tensors, f"h.{i}.{_LAYER_NAMES[path]}", shape[1:], rest)
                             for i in range(layers.start, layers.stop)])
        return read_layers
    raise HFCheckpointError(f"our parameter {path!r} has no counterpart in GPT-2 checkpoints")


def load_tokenizer(directory: pathlib.Path, vocab_size: int) -> Tokenizer | None:
    """tokenizer.json, else GPT-2's vocab.json + merges.txt as a byte-level BPE; None if neither is there."""
    tokenizer_json, vocab, merges = (directory / n for n in ("tokenizer.json", "vocab.json", "merges.txt"))
    try:
        if tokenizer_json.is_file():
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
        elif vocab.is_file() and merges.is_file():
            tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
        else:
            return None
    except Exception as e:  # the Rust parser raises a bare Exception on malformed files
        raise HFCheckpointError(f"cannot read the tokenizer files in {directory}: {e}") from None
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise HFCheckpointError(f"the tokenizer in {directory} has {tokenizer.get_vocab_size()} tokens but the "
                                f"model's vocab_size is {vocab_size}")
    return tokenizer


def _import(directory: pathlib.Path, config: ml_collections.ConfigDict, abstract: nnx.Module,
            extra_shapes: dict[str, tuple[int, ...]], mesh: Mesh | None, rules: Rules) -> nnx.Module:
    """`abstract` (our model's shapes) with every parameter read from the directory's weights, which must
    hold the GPT-2 tensors of `config.model` and `extra_shapes` (a head's) and nothing else."""
    if mesh is not None:
        for axis, size in mesh.shape.items():
            config.mesh[axis] = size
        config.mesh.rules = [list(rule) for rule in rules]
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, rules)))
    tensors = _Tensors(directory)
    try:
        tensors.check({**hf_tensor_shapes(config.model), **extra_shapes}, str(directory))
        tensors.check_tied_head(str(directory))
        flat = []
        for key, var in nnx.to_flat_state(abstract_state):
            shape, dtype = var.get_value().shape, var.get_value().dtype
            sharding = (shardings[key].get_value() if mesh is not None
                        else SingleDeviceSharding(jax.devices()[0]))
            read = _param_reader("/".join(map(str, key)), tensors, shape, config.model.vocab_size)
            array = jax.make_array_from_callback(
                shape, sharding, lambda index, read=read, shape=shape, dtype=dtype:
                read(_full_index(index, shape)).astype(dtype))
            flat.append((key, var.replace(array)))
    finally:
        tensors.close()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _eos_ids(hf_cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = hf_cfg["eos_token_id"]
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return tuple(i for i in eos_ids if 0 <= i < hf_cfg["vocab_size"])


def from_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                    param_dtype: str = "float32", compute_dtype: str = "float32",
                    vocab_pad_multiple: int = 1) -> Pretrained:
    """Import a local Hugging Face GPT-2 / Cerebras-GPT directory as our GPT.

    With `mesh`, every parameter is placed by the logical-axis `rules` and each device reads only its
    shard from the files. `vocab_pad_multiple` pads the embedding rows (zeros) so that a 'vocab' axis
    can be split over the mesh (e.g. 50257 → 50304 with 128).
    """
    with local_directory(path) as directory:  # a bucket's files: through a temporary local copy
        hf_cfg = read_hf_config(directory)
        config = config_from_hf(hf_cfg, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                vocab_pad_multiple=vocab_pad_multiple)
        tokenizer = load_tokenizer(directory, hf_cfg["vocab_size"])
        model = _import(directory, config, abstract_model(config.model), {}, mesh, rules)
        return Pretrained(model, config, tokenizer, _eos_ids(hf_cfg))


# --- sequence classification --------------------------------------------------------------------------

class PretrainedClassifier(NamedTuple):
    model: SequenceClassifier  # tokens [B, L], lengths [B] → float32 class logits [B, C]
    config: ml_collections.ConfigDict  # as Pretrained's, with finetune.num_labels and finetune.loss set
    tokenizer: Tokenizer | None
    label_names: list[str]  # config.json's id2label in id order
    pad_token_id: int | None  # what transformers pools by; our pooling takes explicit lengths instead


# problem_type → our finetune.loss ('regression' has no counterpart: a classifier has at least 2 labels)
_PROBLEM_TYPES = {None: "softmax", "single_label_classification": "softmax", "multi_label_classification": "sigmoid"}


def classifier_labels(hf_cfg: dict[str, Any], source: str) -> list[str]:
    """The label names of a GPT2ForSequenceClassification config.json, by id (transformers' default
    when it has no id2label: LABEL_0, LABEL_1)."""
    id2label = hf_cfg.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
    if not isinstance(id2label, dict) or sorted(map(str, id2label)) != sorted(map(str, range(len(id2label)))):
        raise HFCheckpointError(f"{source}: id2label={id2label!r} must map the ids 0..N-1 to label names")
    if len(id2label) < 2:
        raise HFCheckpointError(f"{source}: id2label has {len(id2label)} label; a classifier needs at least two")
    return [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(len(id2label))]


def classifier_from_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None,
                               rules: Rules = DEFAULT_RULES, param_dtype: str = "float32",
                               compute_dtype: str = "float32", vocab_pad_multiple: int = 1) -> PretrainedClassifier:
    """Import a local GPT2ForSequenceClassification directory as our SequenceClassifier (arguments as
    `from_pretrained`). Its logits equal transformers' wherever transformers pools the row's last real
    token: rows without padding, or padding with its pad_token_id that the text never contains."""
    with local_directory(path) as directory:  # a bucket's files: through a temporary local copy
        hf_cfg = read_hf_config(directory, CLASSIFIER_ARCHITECTURES)
        source = str(directory / CONFIG_FILE)
        label_names = classifier_labels(hf_cfg, source)
        problem_type = hf_cfg.get("problem_type")
        if problem_type not in _PROBLEM_TYPES:
            raise HFCheckpointError(f"{source}: problem_type={problem_type!r}; only {list(_PROBLEM_TYPES)[1:]} "
                                    f"can be imported")
        config = config_from_hf(hf_cfg, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                vocab_pad_multiple=vocab_pad_multiple)
        config.finetune.num_labels, config.finetune.loss = len(label_names), _PROBLEM_TYPES[problem_type]
        abstract = nnx.eval_shape(lambda: SequenceClassifier(config.model, len(label_names), rngs=nnx.Rngs(0)))
        model = _import(directory, config, abstract, {_SCORE: (len(label_names), config.model.d_model)}, mesh, rules)
        return PretrainedClassifier(model, config, load_tokenizer(directory, hf_cfg["vocab_size"]), label_names,
                                    hf_cfg.get("pad_token_id"))


# --- export --------------------------------------------------------------------------------------

def _write_safetensors(path: pathlib.Path, tensors: list[tuple[str, tuple[int, ...], np.dtype,
                                                               Callable[[], np.ndarray]]]) -> None:
    """Stream tensors into a safetensors file one at a time (the header is known from shapes alone).

    Format: little-endian u64 header length, JSON header (name → dtype, shape, byte offsets) padded with
    spaces to 8 bytes, then the raw little-endian data in header order.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, fetch in tensors:
            array = np.ascontiguousarray(fetch())
            if array.shape != shape or array.dtype != dtype:
                raise RuntimeError(f"{name}: got {array.dtype}{array.shape}, header says {dtype}{shape}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(partial, path)


def _save(model: GPT, path: str | os.PathLike, config: dict[str, Any], head: dict[str, str],
          tokenizer: Tokenizer | None) -> None:
    """Write `model`'s decoder tensors, plus its `head` parameters (our name → HF name, transposed: a head
    [d_model, n] is stored [n, d_model] as torch's Linear), with `config` as config.json."""
    cfg = model.cfg
    params = {"/".join(map(str, key)): var.get_value() for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for name, array in params.items():
        if not array.is_fully_addressable:
            raise HFCheckpointError(f"parameter {name} spans several processes; export from a single process "
                                    "(e.g. restore the checkpoint on one host)")
    names = {**_GLOBAL_NAMES, **_LAYER_NAMES, **head}
    missing = sorted(set(names) - set(params))
    extra = sorted(set(params) - set(names))
    if missing or extra:
        raise HFCheckpointError(f"the model's parameters do not match GPT-2's: missing {missing}, extra {extra}")
    shapes = hf_tensor_shapes(cfg)
    entries = []
    for ours, hf_name in _GLOBAL_NAMES.items():
        shape = shapes[hf_name]
        # [:rows] drops wte's vocabulary padding; for the other global tensors it takes everything.
        entries.append((f"transformer.{hf_name}", shape, np.dtype(params[ours].dtype),
                        lambda ours=ours, shape=shape: np.asarray(params[ours][:shape[0]]).reshape(shape)))
    for i in range(cfg.n_layers):
        for ours, suffix in _LAYER_NAMES.items():
            shape = shapes[f"h.{i}.{suffix}"]
            entries.append((f"transformer.h.{i}.{suffix}", shape, np.dtype(params[ours].dtype),
                            lambda ours=ours, i=i, shape=shape: np.asarray(params[ours][i]).reshape(shape)))
    for ours, hf_name in head.items():
        entries.append((hf_name, params[ours].shape[::-1], np.dtype(params[ours].dtype),
                        lambda ours=ours: np.asarray(params[ours]).T))
    if storage.is_remote(path):  # safetensors writes a local file: write there, then upload
        with tempfile.TemporaryDirectory(prefix="cgpt_jax-hf-") as tmp:
            _write_files(pathlib.Path(tmp), entries, config, tokenizer)
            _upload(pathlib.Path(tmp), path)
    else:
        _write_files(pathlib.Path(path), entries, config, tokenizer)


def _write_files(directory: pathlib.Path, entries: list, config: dict[str, Any], tokenizer: Tokenizer | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _write_safetensors(directory / SAFETENSORS_FILE, entries)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))


def _check_token_ids(cfg: ml_collections.ConfigDict, **token_ids: int | None) -> None:
    for name, token_id in token_ids.items():
        if token_id is not None and not 0 <= token_id < cfg.vocab_size:
            raise HFCheckpointError(f"{name}={token_id} is outside the vocabulary [0, {cfg.vocab_size})")


def save_pretrained(model: GPT, path: str | os.PathLike, *, tokenizer: Tokenizer | None = None,
                    bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
    """Write `model` as an HF GPT2LMHeadModel directory: config.json, model.safetensors (+ tokenizer.json).

    Tensors are fetched and written one layer at a time, so the host never holds the whole model.
    Vocabulary padding rows are dropped; the tied LM head is not stored (transformers re-ties it).
    """
    config = hf_config_dict(model.cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    _check_token_ids(model.cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    _save(model, path, config, {}, tokenizer)


def save_classifier(model: SequenceClassifier, path: str | os.PathLike, *, label_names: list[str],
                    loss: str = "softmax", pad_token_id: int | None = None, tokenizer: Tokenizer | None = None,
                    bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
    """Write `model` as an HF GPT2ForSequenceClassification directory (`score` stored as score.weight
    [num_labels, d_model]; id2label/label2id from `label_names`; problem_type from `loss`).

    transformers pools each row at its last token that is not `pad_token_id`; give the id the rows are
    padded with (ours: the tokenizer's EOS, which a text never contains) so that padded batches pool where
    ours do. Without one, transformers classifies only batches of one row.
    """
    cfg = model.cfg
    if parameterization.is_mup(cfg):
        raise HFCheckpointError("a muP model exports as BTLM, which has no sequence-classification class in "
                                "transformers; export the classifier of a standard-parameterization model")
    if len(label_names) != model.num_labels or len(set(label_names)) != len(label_names):
        raise HFCheckpointError(f"label_names={label_names} must be {model.num_labels} distinct names, one per "
                                f"class of the model's head")
    _check_token_ids(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    config = hf_config_dict(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    problem_type = {"softmax": "single_label_classification", "sigmoid": "multi_label_classification"}[loss]
    config.update(architectures=[CLASSIFIER], id2label={str(i): name for i, name in enumerate(label_names)},
                  label2id={name: i for i, name in enumerate(label_names)}, pad_token_id=pad_token_id,
                  problem_type=problem_type)
    _save(model, path, config, {HEAD: _SCORE}, tokenizer)
