"""Write a quantized checkpoint once, from a training run, a fine-tuned classifier or a Hugging Face directory.

    python -m cgpt_jax.quantize --checkpoint=RUN_OR_HF_DIR --scheme=int8|int4|int4:group=G --output=DIR

`generate --checkpoint=DIR`, the evaluation harness (`checkpoint=DIR`) and `quantize.load(DIR)` then load
a language model's without materialising float32 weights, and `classify --checkpoint=DIR` a classifier's
(a fine-tuning run with labels, or an HF ...ForSequenceClassification directory). Prints the weight bytes
before and after.
"""
from __future__ import annotations

import json

from absl import app, flags
from flax import nnx
from tokenizers import Tokenizer

from cgpt_jax import cli, quantize, storage
from cgpt_jax.errors import InputError
from cgpt_jax.finetune import predict
from cgpt_jax.generate import load
from cgpt_jax.parallel.sharding import DEFAULT_RULES
from cgpt_jax.quantize.checkpoint import source_identity
from cgpt_jax.train.checkpoint import CheckpointError


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "The float model: a training run directory or a Hugging Face directory.")
    flags.DEFINE_string("scheme", None, "int8, int4 or int4:group=G.")
    flags.DEFINE_string("output", None, "A new (or empty) directory for the quantized checkpoint.")
    flags.mark_flags_as_required(["checkpoint", "scheme", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    given = flags.FLAGS
    scheme = quantize.parse(given.scheme)
    source, output = cli.resolve_path(given.checkpoint), storage.path(given.output)
    if quantize.is_checkpoint(source):
        raise InputError(f"--checkpoint={given.checkpoint} is already quantized — quantize the float model")
    storage.check_workdir(str(output), "--output")  # a bucket that exists and takes writes
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"--output={given.output} exists and is not an empty directory — give a new directory")
    if predict.is_classifier(storage.path(source)):
        classifier = predict.load_classifier(source)
        float_state = nnx.state(classifier.model)
        model = quantize.apply(classifier.model, scheme)
        quantize.save(output, model, scheme, source=source_identity(source, float_state), rules=DEFAULT_RULES,
                      tokenizer=Tokenizer.from_str(classifier.tokenizer.json), classifier=classifier.head())
    else:
        try:
            loaded, _ = load(source)
        except (ValueError, CheckpointError) as e:
            raise InputError(str(e)) from e
        float_state = nnx.state(loaded.model)
        model = quantize.apply(loaded.model, scheme)
        quantize.save(output, model, scheme, source=source_identity(source, float_state), rules=loaded.rules,
                      tokenizer=loaded.tokenizer, eos_ids=loaded.eos_ids)
    print(json.dumps({"output": str(output), "scheme": scheme.name,
                      "float_bytes": quantize.weight_bytes(float_state)["total"],
                      "quantized_bytes": quantize.weight_bytes(nnx.state(model))}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
