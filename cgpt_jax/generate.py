"""Generate text from a trained run or a Hugging Face model directory, streaming it to stdout.

    python -m cgpt_jax.generate --checkpoint=<run dir or HF dir> --prompt="Once upon a time"
        [--max_new_tokens=64] [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0]
        [--stop_ids=50256,...] [--truncate_prompt] [--tensor_parallel=N] [--prompt_ids=1,2,3]
        [--quantize=int8|int4|int4:group=G]

The directory may be local, gs:// or s3:// (docs/cluster_storage.md). A run directory (what
`python -m cgpt_jax.train` writes) gives the parameters of its newest complete
checkpoint and the tokenizer of its token store; an HF directory is imported with
`cgpt_jax.interop.hf.from_pretrained`. Generation stops at the model's end-of-text token unless
`--stop_ids` says otherwise. Models without a tokenizer (synthetic data) take `--prompt_ids`.
`--quantize` quantizes the weights after loading (cgpt_jax/quantize); a quantized checkpoint directory
(`python -m cgpt_jax.quantize`) is loaded as it is, its scheme checked against `--quantize` when given.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import TextIO

import jax
import ml_collections
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from tokenizers import Tokenizer

from cgpt_jax import cli, quantize, storage
from cgpt_jax.errors import InputError
from cgpt_jax.infer import Generator, Sampling
from cgpt_jax.interop import hf
from cgpt_jax.model import GPT
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.parallel.sharding import Rules, state_shardings
from cgpt_jax.peft import training as peft_training
from cgpt_jax.run_dir import CONFIG as RUN_CONFIG
from cgpt_jax.train import checkpoint

EOS = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class Loaded:
    model: GPT
    tokenizer: Tokenizer | None
    eos_ids: tuple[int, ...]
    rules: Rules  # logical-axis rules for placing it on a mesh


def load_run(run_dir: storage.Path, mesh: Mesh | None) -> Loaded:
    """The newest complete checkpoint of a training run, placed on `mesh` (or the first device)."""
    raw = json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    description = raw.pop("data_description", {})
    config = ml_collections.ConfigDict(raw)
    graphdef, abstract_params = nnx.split(peft_training.abstract_model(config))  # a LoRA run's too
    if mesh is not None:
        shardings = state_shardings(abstract_params, mesh, config.mesh.rules)
    else:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract_params)
    like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings)
    source = checkpoint.find_init_source(str(run_dir), checkpoint.tensor_specs(abstract_params, "params/"),
                                         flag="--checkpoint")
    model = nnx.merge(graphdef, checkpoint.load_init_params(source, like))
    return Loaded(model, *store_tokenizer(description), list(config.mesh.rules))


def store_tokenizer(data_description: dict) -> tuple[Tokenizer | None, tuple[int, ...]]:
    """The tokenizer of a run's token store (None for synthetic data) and its end-of-text id (if any); the
    store may be in a bucket (read through storage, no local copy needed)."""
    if "store" not in data_description:
        return None, ()
    tokenizer_file = storage.path(data_description["store"], "tokenizer.json")
    if not tokenizer_file.is_file():
        return None, ()
    tokenizer = Tokenizer.from_str(tokenizer_file.read_text(encoding="utf-8"))
    eos = tokenizer.token_to_id(EOS)
    return tokenizer, () if eos is None else (eos,)


def load(path: str, tensor_parallel: int = 1, scheme: str | None = None) -> tuple[Loaded, Mesh | None]:
    """A run directory, an HF directory (told apart by their config.json) or a quantized checkpoint; with
    `scheme` (e.g. 'int8'), its weights quantized. `path` may be local, gs:// or s3://."""
    directory = storage.path(path)
    parsed = None if scheme is None else quantize.parse(scheme)
    config_file = directory / hf.CONFIG_FILE
    if parsed is not None or quantize.is_checkpoint(directory):
        return _load_quantized(directory, tensor_parallel, parsed)
    if not config_file.is_file():
        raise ValueError(f"--checkpoint={path}: no {hf.CONFIG_FILE} there; give a training run directory or a "
                         f"Hugging Face model directory")
    mesh = _tensor_mesh(tensor_parallel)
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if "model_type" in raw:
        # The vocabulary is split over 'tensor': pad it to a multiple the mesh divides.
        pretrained = hf.from_pretrained(str(directory), mesh=mesh, vocab_pad_multiple=math.lcm(128, tensor_parallel))
        return Loaded(pretrained.model, pretrained.tokenizer, pretrained.eos_token_ids,
                      list(pretrained.config.mesh.rules)), mesh
    if "model" in raw:
        return load_run(directory, mesh), mesh
    raise ValueError(f"--checkpoint={path}: {config_file} is neither a training run's config (no 'model') nor "
                     f"a Hugging Face config (no 'model_type')")


def _tensor_mesh(tensor_parallel: int) -> Mesh | None:
    if tensor_parallel == 1:
        return None
    if tensor_parallel > jax.device_count():
        raise ValueError(f"--tensor_parallel={tensor_parallel} but only {jax.device_count()} devices exist")
    return make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": tensor_parallel}),
                     jax.devices()[:tensor_parallel])


def _load_quantized(directory: storage.Path, tensor_parallel: int,
                    scheme: quantize.Scheme | None) -> tuple[Loaded, Mesh | None]:
    """A quantized checkpoint as saved, or a float model quantized with `scheme` after loading."""
    if quantize.is_checkpoint(directory):
        mesh = _tensor_mesh(tensor_parallel)
        saved = quantize.load(directory, scheme=scheme, mesh=mesh)
        if saved.classifier is not None:
            raise ValueError(f"--checkpoint={directory} is a quantized classifier of {saved.classifier.num_labels} "
                             f"labels, not a language model — classify texts with python -m cgpt_jax.classify "
                             f"--checkpoint={directory}")
        return Loaded(saved.model, saved.tokenizer, saved.eos_ids, saved.rules), mesh
    loaded, mesh = load(str(directory), tensor_parallel)
    return dataclasses.replace(loaded, model=quantize.apply(loaded.model, scheme)), mesh


def run(loaded: Loaded, mesh: Mesh | None, *, prompt: str | None, prompt_ids: list[int] | None,
        max_new_tokens: int, sampling: Sampling, seed: int, stop_ids: list[int] | None, truncate_prompt: bool,
        out: TextIO) -> list[int]:
    """Generate for one prompt, writing the text (or ids) to `out` as it comes; returns the new ids."""
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of --prompt (text) and --prompt_ids (comma-separated token ids)")
    if prompt is not None:
        if loaded.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; pass the prompt as --prompt_ids=1,2,3")
        prompt_ids = loaded.tokenizer.encode(prompt, add_special_tokens=False).ids
    stop = set(loaded.eos_ids if stop_ids is None else stop_ids)
    generator = Generator(loaded.model, mesh=mesh, rules=loaded.rules)
    out.write(prompt if prompt is not None else " ".join(map(str, prompt_ids)))
    out.flush()
    new_ids: list[int] = []
    printed = ""
    for step in generator.stream([prompt_ids], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                 stop_tokens=sorted(stop), truncate_prompt=truncate_prompt):
        token = step[0]
        if token is None or token in stop:
            break
        new_ids.append(token)
        if loaded.tokenizer is None:
            out.write(f" {token}")
        else:
            text = loaded.tokenizer.decode(new_ids, skip_special_tokens=False)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(text[len(printed):])
                printed = text
        out.flush()
    out.write("\n")
    return new_ids


def define_flags() -> None:
    """Defined only when run as a command: library users of `load` and `run` (evaluation, tests) import this
    module next to other commands without their flags colliding."""
    flags.DEFINE_string("checkpoint", None, "Training run directory or Hugging Face model directory.")
    flags.DEFINE_string("prompt", None, "Prompt text (needs the model's tokenizer).")
    flags.DEFINE_list("prompt_ids", None, "Prompt as comma-separated token ids.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this probability mass (1: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_list("stop_ids", None, "Token ids that end generation (default: the model's EOS; "
                      "--stop_ids= for none).")
    flags.DEFINE_bool("truncate_prompt", False, "Keep the last tokens of a prompt too long for the "
                      "context instead of failing.")
    flags.DEFINE_integer("tensor_parallel", 1, "Devices to split heads, MLP and vocabulary over.")
    flags.DEFINE_string("quantize", None, "Weight-only quantization: int8, int4 or int4:group=G (inference only).")
    flags.mark_flags_as_required(["checkpoint"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    given = flags.FLAGS
    try:
        loaded, mesh = load(cli.resolve_path(given.checkpoint), given.tensor_parallel, given.quantize)
        run(loaded, mesh, prompt=given.prompt,
            prompt_ids=None if given.prompt_ids is None else [int(t) for t in given.prompt_ids],
            max_new_tokens=given.max_new_tokens,
            sampling=Sampling(temperature=given.temperature, top_k=given.top_k, top_p=given.top_p),
            seed=given.seed, stop_ids=None if given.stop_ids is None else [int(t) for t in given.stop_ids],
            truncate_prompt=given.truncate_prompt, out=sys.stdout)
    except (ValueError, checkpoint.CheckpointError) as e:  # the message says what to change
        raise InputError(str(e)) from e


if __name__ == "__main__":
    define_flags()
    cli.run(main)
