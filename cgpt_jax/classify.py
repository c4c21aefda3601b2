"""Classify texts with a fine-tuned run (python -m cgpt_jax.finetune's workdir).

    python -m cgpt_jax.classify --checkpoint=RUN_DIR --text="def read_config(path): ..." [--text=...]
    python -m cgpt_jax.classify --checkpoint=RUN_DIR --input=texts.jsonl --output=predictions.csv
    some_command | python -m cgpt_jax.classify --checkpoint=RUN_DIR          (one text per line of stdin)

Each text gets one record: the text, its predicted `label` and the `probabilities` of every label (a softmax,
or each label's sigmoid for a run trained with finetune.loss=sigmoid); a multi-label run's records have
`labels` instead: every label with probability >= 0.5. Records go to stdout as JSON lines, or to --output:
FILE.jsonl (the same lines) or FILE.csv (text, label (or labels, joined by '|'), then one prob_<label>
column per label).
--input is a .jsonl or .csv/.tsv file (the text in the field named by --text_field) or any other file with
one text per line (blank lines skipped). The run's best checkpoint (DIR/best/) is used when it has one,
else its newest; texts longer than the run's max_len are cut to their first max_len tokens, as in training.
--quantize=int8|int4|int4:group=G runs the classifier with weight-only quantized weights (cgpt_jax/quantize);
--checkpoint may also be a quantized classifier checkpoint (python -m cgpt_jax.quantize --checkpoint=RUN_DIR).
"""
from __future__ import annotations

import csv
import io
import json
import sys
from typing import TextIO

import numpy as np
from absl import app, flags, logging

from cgpt_jax import cli, quantize, storage
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.data import MULTI_LABEL_SEPARATOR, read_texts
from cgpt_jax.finetune.predict import Classifier, load_classifier



def define_flags() -> None:
    """Defined only when run as a command: importing this module (tests, a process that also imports
    `cgpt_jax.generate`, whose --checkpoint means a language model) defines no flags."""
    flags.DEFINE_string("checkpoint", None, "A fine-tuning run's directory.")
    flags.DEFINE_multi_string("text", None, "A text to classify (repeat for several).")
    flags.DEFINE_string("input", None, "File of texts: .jsonl, .csv/.tsv, or one text per line ('-': stdin).")
    flags.DEFINE_string("text_field", "text", "The text's field (JSONL) or column (CSV) in --input.")
    flags.DEFINE_string("output", None, "Write the records to FILE.jsonl or FILE.csv instead of stdout.")
    flags.DEFINE_integer("batch_size", 32, "Texts per forward pass.")
    flags.DEFINE_string("quantize", None, "Weight-only quantization: int8, int4 or int4:group=G (inference only).")
    flags.mark_flags_as_required(["checkpoint"])

OUTPUT_KINDS = (".jsonl", ".csv")


def _lines(lines: TextIO | list[str], source: str) -> list[tuple[str, str]]:
    """(text, 'SOURCE:LINE') of every non-blank line."""
    return [(line.rstrip("\n"), f"{source}:{n}") for n, line in enumerate(lines, 1) if line.strip()]


def read_inputs(texts: list[str] | None, input_path: str | None, text_field: str) -> list[str]:
    """The texts of --text, else of --input, else of stdin's lines; empty input is refused."""
    if texts and input_path:
        raise InputError("--text and --input both given — classify either the --text values or the file")
    if texts:
        for i, text in enumerate(texts, 1):
            if not text.strip():
                raise InputError(f"--text number {i} is empty — give it some text")
        return texts
    if input_path is None or input_path == "-":
        rows = _lines(sys.stdin, "stdin")
    else:
        path = storage.path(cli.resolve_path(input_path))  # local, gs:// or s3://
        if path.suffix in (".jsonl", ".csv", ".tsv"):
            rows = read_texts(path, text_field, "text_field")
        elif not path.is_file():
            raise InputError(f"--input={input_path}: {path} is not there — check the path")
        else:
            rows = _lines(io.StringIO(path.read_bytes().decode("utf-8"), newline=None), str(path))
    if not rows:
        raise InputError(f"--input={input_path or '-'}: no texts — give a file with at least one text")
    return [text for text, _ in rows]


def records(texts: list[str], probabilities_NxC: np.ndarray, label_names: list[str],
            multi_label: bool = False) -> list[dict]:
    """One record per text: its `label` (the most probable), or for a multi-label run its `labels` (every
    label whose probability is >= 0.5, most probable first), and every label's probability."""
    rows = []
    for text, p_C in zip(texts, probabilities_NxC):
        if multi_label:
            chosen = {"labels": [label_names[i] for i in np.argsort(-p_C, kind="stable") if p_C[i] >= 0.5]}
        else:
            chosen = {"label": label_names[int(p_C.argmax())]}
        rows.append({"text": text, **chosen, "probabilities": {name: float(p) for name, p in zip(label_names, p_C)}})
    return rows


def write_records(rows: list[dict], label_names: list[str], out: TextIO, kind: str) -> None:
    if kind == ".csv":
        writer = csv.writer(out)
        multi_label = bool(rows) and "labels" in rows[0]
        writer.writerow(["text", "labels" if multi_label else "label", *(f"prob_{name}" for name in label_names)])
        for r in rows:
            chosen = MULTI_LABEL_SEPARATOR.join(r["labels"]) if multi_label else r["label"]
            writer.writerow([r["text"], chosen, *(r["probabilities"][name] for name in label_names)])
    else:
        for r in rows:
            out.write(json.dumps(r) + "\n")


def classify(classifier: Classifier, texts: list[str], batch_size: int) -> list[dict]:
    probabilities_NxC, truncated = classifier.predict(texts, batch_size)
    if truncated:
        logging.info("%d of %d texts were cut to their first %d tokens", truncated, len(texts), classifier.max_len)
    return records(texts, probabilities_NxC, classifier.label_names, classifier.multi_label)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    given = flags.FLAGS
    if given.batch_size < 1:
        raise InputError(f"--batch_size={given.batch_size} — give a positive number of texts per batch")
    output = cli.resolve_optional_path(given.output)
    kind = storage.path(output).suffix if output else ".jsonl"
    if kind not in OUTPUT_KINDS:
        raise InputError(f"--output={given.output}: write FILE.jsonl or FILE.csv")
    if output and storage.is_remote(output):
        storage.check_workdir(output.rsplit("/", 1)[0], "--output")  # the bucket exists and takes writes
    elif output and not storage.path(output).parent.is_dir():
        raise InputError(f"--output={given.output}: the directory {storage.path(output).parent} is not there — "
                         f"create it first")
    scheme = None if given.quantize is None else quantize.parse(given.quantize)
    texts = read_inputs(given.text, given.input, given.text_field)
    classifier = load_classifier(cli.resolve_path(given.checkpoint), scheme)
    logging.info("classifier from %s; %d texts", classifier.source, len(texts))
    rows = classify(classifier, texts, given.batch_size)
    if output is None:
        write_records(rows, classifier.label_names, sys.stdout, kind)
        return
    written = io.StringIO(newline="")  # the csv module writes its own line ends
    write_records(rows, classifier.label_names, written, kind)
    storage.write_atomically(output, written.getvalue())  # one upload on a bucket: whole or not at all


if __name__ == "__main__":
    define_flags()
    cli.run(main)
