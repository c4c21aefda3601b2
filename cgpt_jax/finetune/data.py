"""Labelled text for classification: read, check, tokenize with the backbone's tokenizer, batch.

Tasks (`finetune.task`):
  'stdlib_topics'  offline, on every machine: the functions and methods of eight standard-library
                   packages of the running interpreter, labelled by their package. Split by source file
                   (each package's files, in hash order, fill test, then validation, to ~10% each), so
                   no file's code is in two splits.
  'csv:PATH'       PATH a directory with train.csv, validation.csv and test.csv (or .tsv), or one .csv/.tsv
                   file split deterministically by a hash of each text (finetune.val_fraction,
                   test_fraction). Columns named by finetune.text_field and finetune.label_field.
  'jsonl:PATH'     the same with .jsonl files: one JSON object per line.
  'tfds:NAME'      a TFDS text-classification dataset prepared locally as array_record (in
                   config.data.tfds_data_dir, or TFDS's default directory): the label is the ClassLabel feature
                   finetune.label_field, the text the feature finetune.text_field or else the only Text
                   feature. A split that is missing or unlabelled (label -1, as GLUE's test splits) is taken
                   from train by a hash of each text (finetune.test_fraction, val_fraction).
Labels are names (or, with finetune.label_names listed, also their integer ids). Multi-label data gives
each text a list of labels (possibly empty): a JSON list in .jsonl (`"label": ["io", "net"]`), or in a
.csv/.tsv cell the labels separated by MULTI_LABEL_SEPARATOR `|` (`io|net`; once any cell of the task holds
a `|`, every cell is read as such a list). It trains with finetune.loss='sigmoid'; a .jsonl task that mixes
lists and single labels is refused. Every problem in the input is an error naming the file, the line or
the field, and the fix, raised before anything compiles.

Training batches (`ClassificationData`) are drawn per epoch from a seeded permutation; with
finetune.length_buckets each batch holds texts of one length bucket and is padded to it (see `epoch_batches`).
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import sysconfig
import textwrap
from collections import Counter
from typing import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from cgpt_jax import storage
from cgpt_jax.data.tokenizer import TextTokenizer
from cgpt_jax.errors import InputError

SPLITS = ("train", "validation", "test")
MULTI_LABEL_SEPARATOR = "|"  # between the labels of a multi-label .csv/.tsv cell
STDLIB_TOPICS = ("asyncio", "email", "idlelib", "importlib", "multiprocessing", "tkinter", "unittest", "xml")
_TEST_DIRS = ("test", "tests", "idle_test", "__pycache__")  # the packages' own test suites are left out
_STDLIB_HELD_OUT = 0.1  # share of each package's examples in test, and again in validation


class TaskError(InputError):
    """Labelled data that cannot be used; the message names the file, line or field and the fix."""


Label = str | tuple[str, ...]  # one label, or the list of a multi-label text


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: Label  # as written in the data (a name, or an id when label_names are given)
    where: str  # 'FILE:LINE', for messages


def _labels_of(label: Label) -> tuple[str, ...]:
    return label if isinstance(label, tuple) else (label,)


@dataclasses.dataclass(frozen=True)
class Task:
    splits: dict[str, list[Example]]  # train, validation, test
    label_names: list[str]  # class id → name
    multi_label: bool = False  # each example's label is a tuple of names

    def label_ids(self, split: str) -> np.ndarray:
        """Class ids [N], or for multi-label data 0/1 indicators [N, C]."""
        index = {name: i for i, name in enumerate(self.label_names)}
        if not self.multi_label:
            return np.array([index[e.label] for e in self.splits[split]], np.int32)
        indicators_NxC = np.zeros((len(self.splits[split]), len(self.label_names)), np.int32)
        for row, e in enumerate(self.splits[split]):
            indicators_NxC[row, [index[name] for name in e.label]] = 1
        return indicators_NxC


def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") / 2**64


# --- the offline default task -------------------------------------------------------------------------

def _definitions(path: pathlib.Path, rel: str) -> list[Example]:
    """Module-level functions and the methods of module-level classes, dedented, labelled by package."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a few stdlib files are deliberately invalid (lib2to3 test data); not examples
        return []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = []
    for node in tree.body:
        if isinstance(node, functions):
            nodes.append(node)
        elif isinstance(node, ast.ClassDef):
            nodes.extend(n for n in node.body if isinstance(n, functions))
    package = rel.split("/", 1)[0]
    return [Example(textwrap.dedent(ast.get_source_segment(source, n, padded=True)), package, f"{rel}:{n.lineno}")
            for n in nodes]


def stdlib_topics() -> Task:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for package in STDLIB_TOPICS:
        files = []
        for dirpath, dirnames, filenames in os.walk(root / package):
            dirnames[:] = sorted(d for d in dirnames if d not in _TEST_DIRS)
            for name in sorted(filenames):
                if name.endswith(".py"):
                    rel = pathlib.Path(dirpath, name).relative_to(root).as_posix()
                    files.append((_hash_fraction(rel), rel, _definitions(root / rel, rel)))
        if not files:
            raise TaskError(f"task=stdlib_topics: the standard library at {root} has no package {package!r}; "
                            f"this interpreter's stdlib is incomplete, use task=csv:... or task=jsonl:...")
        total = sum(len(examples) for _, _, examples in files)
        target = _STDLIB_HELD_OUT * total
        held = {"test": 0, "validation": 0}
        for _, _, examples in sorted(files):  # hash order: a fixed, unbiased order of the files
            # A file goes to a held-out split that is short of its share and stays under 1.5x it (a huge
            # file such as tkinter/__init__.py trains instead of filling a split alone).
            split = next((s for s in held if held[s] < target and held[s] + len(examples) <= 1.5 * target),
                         "train")
            if split in held:
                held[split] += len(examples)
            splits[split].extend(examples)
    return Task(splits, list(STDLIB_TOPICS))


# --- files ------------------------------------------------------------------------------------------

# (config field that names the column, column name): the columns a reader must find
Fields = tuple[tuple[str, str], ...]


def data_file(location: str) -> pathlib.Path | storage.Path:
    """A task or input file or directory: gs:// and s3:// through storage; a local path as given, `~`
    expanded (a relative path stays relative in messages)."""
    return storage.path(location) if storage.is_remote(location) else pathlib.Path(os.path.expanduser(location))


def _text_of(path: pathlib.Path | storage.Path, newline: str | None) -> io.StringIO:
    """The whole file, read in one request (a bucket has no line-by-line reads worth having)."""
    return io.StringIO(path.read_bytes().decode("utf-8"), newline=newline)


def _read_csv(path: pathlib.Path | storage.Path, fields: Fields) -> Iterator[tuple[list, str]]:
    """Each row's values of `fields`, with 'FILE:LINE'."""
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with _text_of(path, newline="") as f:  # csv handles the line ends itself
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        for field, key in fields:
            if key not in columns:
                raise TaskError(f"{path}: line 1: no column {key!r} (the header has {columns}); name the "
                                f"column with --{field}=... or fix the header")
        for row in reader:
            yield [row[key] for _, key in fields], f"{path}:{reader.line_num}"


def _read_jsonl(path: pathlib.Path | storage.Path, fields: Fields) -> Iterator[tuple[list, str]]:
    with _text_of(path, newline=None) as f:  # universal newlines, as open()
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not JSON ({e}); write one JSON object per line") from None
            for field, key in fields:
                if not isinstance(record, dict) or key not in record:
                    raise TaskError(f"{where}: no field {key!r}; name it with --{field}=... or fix the line")
            yield [record[key] for _, key in fields], where


def _check_text(text: object, text_field: str, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise TaskError(f"{where}: the {text_field!r} field is empty; remove the row or give it text")
    return text


def read_texts(path: pathlib.Path | storage.Path, text_field: str, flag: str) -> list[tuple[str, str]]:
    """(text, 'FILE:LINE') of each row of a .csv/.tsv/.jsonl file, the text in column `text_field` (named
    by the command-line `flag`)."""
    if not path.is_file():
        raise TaskError(f"{path} is not there; check the path")
    read = _read_jsonl if path.suffix == ".jsonl" else _read_csv
    return [(_check_text(values[0], text_field, where), where) for values, where in read(path, ((flag, text_field),))]


def _check_label(label: object, label_field: str, where: str) -> str:
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
        raise TaskError(f"{where}: the {label_field!r} field is {label!r}; give a label name or id (or, for "
                        f"multi-label data, a list of them)")
    return str(label).strip()


def _as_multi_label(kind: str, splits: dict[str, list[Example]]) -> dict[str, list[Example]] | None:
    """The splits with every label a tuple when any is a list (None when none is); a .jsonl task that
    mixes lists and single labels is refused."""
    examples = [e for rows in splits.values() for e in rows]
    listed = next((e for e in examples if isinstance(e.label, tuple)), None)
    if listed is None:
        return None
    single = next((e for e in examples if not isinstance(e.label, tuple)), None)
    if single is not None and kind == "jsonl":
        raise TaskError(f"{single.where}: the label {single.label!r} is a single label but {listed.where} has a "
                        f"list {list(listed.label)}; write every label of a multi-label task as a list "
                        f"([{single.label!r}]), or give every text one label")
    return {split: [dataclasses.replace(e, label=_labels_of(e.label)) for e in rows] for split, rows in splits.items()}


def _examples(path: pathlib.Path | storage.Path, kind: str, text_field: str, label_field: str) -> list[Example]:
    if not path.is_file():
        raise TaskError(f"task={kind}:...: {path} is not there; check the path")
    read = _read_csv if kind == "csv" else _read_jsonl
    examples = []
    fields = (("config.finetune.text_field", text_field), ("config.finetune.label_field", label_field))
    for (text, label), where in read(path, fields):
        _check_text(text, text_field, where)
        if isinstance(label, list):
            labels = tuple(_check_label(one, label_field, where) for one in label)
            examples.append(Example(text, labels, where))
        elif kind == "csv" and isinstance(label, str) and MULTI_LABEL_SEPARATOR in label:
            labels = tuple(_check_label(one, label_field, where) for one in label.split(MULTI_LABEL_SEPARATOR))
            examples.append(Example(text, labels, where))
        else:
            examples.append(Example(text, _check_label(label, label_field, where), where))
    if not examples:
        raise TaskError(f"{path}: no examples; the file is empty")
    return examples


def _file_splits(kind: str, path: pathlib.Path | storage.Path,
                 ft: ml_collections.ConfigDict) -> dict[str, list[Example]]:
    fields = (ft.text_field, ft.label_field)
    if path.is_dir():
        extensions = (".csv", ".tsv") if kind == "csv" else (".jsonl",)
        splits = {}
        for split in SPLITS:
            found = [path / f"{split}{ext}" for ext in extensions if (path / f"{split}{ext}").is_file()]
            if not found:
                raise TaskError(f"task={kind}:{path}: {path / (split + extensions[0])} is not there; a directory "
                                f"needs {', '.join(s + extensions[0] for s in SPLITS)} (or give one file to split)")
            splits[split] = _examples(found[0], kind, *fields)
        return splits
    examples = _examples(path, kind, *fields)
    splits = {s: [] for s in SPLITS}
    for e in examples:  # by the text's hash: the same text always lands in the same split
        h = _hash_fraction(e.text)
        splits["test" if h < ft.test_fraction else "validation" if h < ft.test_fraction + ft.val_fraction
               else "train"].append(e)
    for split, rows in splits.items():
        if not rows:
            raise TaskError(f"task={kind}:{path}: {len(examples)} examples leave the {split} split empty; add "
                            f"examples or change finetune.val_fraction / finetune.test_fraction")
    return splits


def _tfds_splits(name: str, ft: ml_collections.ConfigDict, data_dir: str) -> tuple[dict[str, list[Example]], list[str]]:
    import tensorflow_datasets as tfds  # slow to import; only this task needs it

    where = f"task=tfds:{name}"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise TaskError(f"{where}: no TFDS dataset of that name; see tfds.list_builders()") from None
    if not builder.is_prepared():
        raise TaskError(f"{where}: not prepared in {builder.data_dir}; prepare it there with `tfds build {name} "
                        f"--file_format=array_record` or point config.data.tfds_data_dir at where it was")
    if builder.info.file_format not in tfds.core.file_adapters.FileFormat.with_random_access():
        raise TaskError(f"{where}: stored as {builder.info.file_format.value}, which needs TensorFlow to read; "
                        f"prepare it again with --file_format=array_record")
    features = builder.info.features
    label = features[ft.label_field] if ft.label_field in features else None
    if not isinstance(label, tfds.features.ClassLabel):
        raise TaskError(f"{where}: no ClassLabel feature {ft.label_field!r} (features: {sorted(features)}); name "
                        f"it with --config.finetune.label_field=...")
    text_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    text_key = ft.text_field if ft.text_field in features else text_keys[0] if len(text_keys) == 1 else None
    if text_key is None:
        raise TaskError(f"{where}: no text feature {ft.text_field!r} and not exactly one Text feature "
                        f"({text_keys}); name it with --config.finetune.text_field=...")
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        if split not in builder.info.splits:
            continue
        source = builder.as_data_source(split)
        records = source.__getitems__(range(len(source)))
        examples = [Example(r[text_key].decode("utf-8", errors="replace") if isinstance(r[text_key], bytes)
                            else r[text_key], label.names[r[ft.label_field]], f"{where}[{split}]:{i}")
                    for i, r in enumerate(records) if r[ft.label_field] >= 0]
        for e in examples:
            _check_text(e.text, text_key, e.where)
        if examples:
            splits[split] = examples
    if "train" not in splits:
        raise TaskError(f"{where}: no labelled train split (splits: {sorted(builder.info.splits)})")
    held_out = {"test": ft.test_fraction, "validation": ft.val_fraction}
    carved = {s: [] for s in held_out if s not in splits}
    if carved:
        logging.info("%s: %s taken from train by text hash", where, " and ".join(carved))
        kept = []
        for e in splits["train"]:  # the same cut as a single csv/jsonl file's
            h = _hash_fraction(e.text)
            split = "test" if h < ft.test_fraction else "validation" if h < ft.test_fraction + ft.val_fraction else "train"
            (carved[split] if split in carved else kept).append(e)
        splits = {**splits, **carved, "train": kept}
    return {s: splits[s] for s in SPLITS}, list(label.names)


def _label_names(splits: dict[str, list[Example]], given: tuple[str, ...]) -> list[str]:
    if given:
        return list(given)
    labels = sorted({name for e in splits["train"] for name in _labels_of(e.label)})
    return sorted(labels, key=int) if all(x.lstrip("-").isdigit() for x in labels) else labels


def _normalise_label(label: str, where: str, names: list[str], given: bool) -> str:
    if label not in names and given and label.isdigit() and int(label) < len(names):
        label = names[int(label)]
    if label not in names:
        fix = ("fix the row, or list every label in --config.finetune.label_names" if not given
               else "fix the row, or add it to finetune.label_names")
        raise TaskError(f"{where}: label {label!r} is not one of the labels {names} "
                        f"({'finetune.label_names' if given else 'those of the training split'}); {fix}")
    return label


def _normalise_labels(splits: dict[str, list[Example]], names: list[str], given: bool) -> dict[str, list[Example]]:
    """Every label as its name; ids are accepted when label_names were given."""
    out = {}
    for split, examples in splits.items():
        rows = []
        for e in examples:
            labels = tuple(_normalise_label(label, e.where, names, given) for label in _labels_of(e.label))
            rows.append(dataclasses.replace(e, label=labels if isinstance(e.label, tuple) else labels[0]))
        out[split] = rows
    return out


def read_task(ft: ml_collections.ConfigDict, tfds_data_dir: str = "") -> Task:
    """The labelled splits of `finetune.task` (see the module docstring)."""
    kind, _, arg = ft.task.partition(":")
    multi_label = False
    if ft.task == "stdlib_topics":
        task = stdlib_topics()
        splits, names = task.splits, task.label_names
    elif kind == "tfds" and arg:
        splits, names = _tfds_splits(arg, ft, tfds_data_dir)
    elif kind in ("csv", "jsonl") and arg:
        splits = _file_splits(kind, data_file(arg), ft)
        multi = _as_multi_label(kind, splits)
        if multi is not None:
            if ft.loss != "sigmoid":
                raise TaskError(f"finetune.task={ft.task!r} is multi-label (a list of labels per text) but "
                                f"finetune.loss={ft.loss!r}; train it with --config.finetune.loss=sigmoid")
            splits, multi_label = multi, True
        given = tuple(name.strip() for name in ft.label_names.split(",") if name.strip())
        names = _label_names(splits, given)
        splits = _normalise_labels(splits, names, bool(given))
    else:
        raise TaskError(f"finetune.task={ft.task!r}: use 'stdlib_topics', 'csv:PATH', 'jsonl:PATH' or 'tfds:NAME'")
    if len(names) < 2:
        raise TaskError(f"finetune.task={ft.task!r}: only the label(s) {names}; a classifier needs at least two")
    return Task(splits, names, multi_label)


# --- tokens -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Encoded:
    """One split as arrays: token ids right-padded with EOS, real lengths, labels."""

    tokens_NxL: np.ndarray  # int32
    lengths_N: np.ndarray  # int32, 1..L
    labels_N: np.ndarray  # int32 class ids [N]; of a multi-label task 0/1 indicators [N, C]
    truncated: int  # texts longer than L tokens, cut to their first L


def tokenize(texts: list[str], tokenizer: TextTokenizer, max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(token ids [N, max_len] right-padded with EOS, real lengths [N], how many texts were cut to max_len)."""
    ids = tokenizer.encode_batch(texts)
    tokens_NxL = np.full((len(ids), max_len), tokenizer.eos_id, np.int32)
    lengths_N = np.zeros(len(ids), np.int32)
    for i, row in enumerate(ids):
        row = row[:max_len]
        tokens_NxL[i, :len(row)] = row
        lengths_N[i] = len(row)
    return tokens_NxL, lengths_N, int(sum(len(row) > max_len for row in ids))


def encode(texts: list[str], labels_N: np.ndarray, tokenizer: TextTokenizer, max_len: int) -> Encoded:
    tokens_NxL, lengths_N, truncated = tokenize(texts, tokenizer, max_len)
    return Encoded(tokens_NxL, lengths_N, labels_N, truncated)


MIN_BUCKET = 8


def bucket_length(n_tokens: int, max_len: int) -> int:
    """The padded length of a row of `n_tokens`: the next power of two (at least MIN_BUCKET), at most
    max_len. Few distinct shapes (one compile each) and at most 2x padding."""
    return min(max_len, max(MIN_BUCKET, 1 << (max(n_tokens, 1) - 1).bit_length()))


def length_batches(lengths_N: np.ndarray, batch_size: int, max_len: int) -> list[tuple[np.ndarray, int]]:
    """(row indices, padded length) of batches of up to `batch_size` rows of one length bucket each."""
    buckets_N = np.array([bucket_length(int(n), max_len) for n in lengths_N], np.int64)
    batches = []
    for length in np.unique(buckets_N):
        rows = np.flatnonzero(buckets_N == length)
        batches += [(rows[i:i + batch_size], int(length)) for i in range(0, len(rows), batch_size)]
    return batches


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    """The training split's batch of step s as a pure function of (seed, s): epochs of a seeded
    permutation (`epoch_batches`), so a resumed run reads the same batches. Each batch is placed with
    `shardings`."""

    train: Encoded
    global_batch_size: int
    seed: int
    shardings: dict[str, jax.sharding.NamedSharding]
    vocab_size: int
    description: dict
    length_buckets: bool = True  # pad each batch to its length bucket (else to max_len)

    def __post_init__(self):
        if len(self.train.labels_N) < self.global_batch_size:
            raise TaskError(f"the training split has {len(self.train.labels_N)} examples, fewer than one batch "
                            f"(train.global_batch_size={self.global_batch_size}); lower the batch or add examples")

    def epoch_batches(self, epoch: int) -> list[tuple[np.ndarray, int]]:
        """(row indices, padded length) of each batch of `epoch`, in training order: n // batch batches.

        Without length buckets: consecutive slices of the epoch's permutation, padded to max_len. With
        them: each bucket's rows in permutation order are cut into batches, the rows left over joining the
        next longer bucket (the longest bucket's leftover is dropped, as the last partial batch is without
        buckets), and the batches are shuffled. So every batch is padded to one of the bucket lengths
        (`bucket_length`: a bounded set of compiled shapes) and its rows are at most that long."""
        n, b, max_len = len(self.train.labels_N), self.global_batch_size, self.train.tokens_NxL.shape[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        if not self.length_buckets:
            return [(order[k * b:(k + 1) * b], max_len) for k in range(n // b)]
        buckets_N = np.array([bucket_length(int(length), max_len) for length in self.train.lengths_N])
        batches, carried = [], order[:0]
        for length in np.unique(buckets_N):
            rows = np.concatenate([carried, order[buckets_N[order] == length]])
            full = len(rows) // b * b
            batches += [(rows[k:k + b], int(length)) for k in range(0, full, b)]
            carried = rows[full:]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch_rows(self, step: int) -> tuple[np.ndarray, int]:
        """(row indices, padded length) of the batch of `step`."""
        epoch, k = divmod(step, len(self.train.labels_N) // self.global_batch_size)
        return self.epoch_batches(epoch)[k]

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        rows, length = self.batch_rows(step)
        arrays = {"inputs": self.train.tokens_NxL[rows, :length], "lengths": self.train.lengths_N[rows],
                  "labels": self.train.labels_N[rows]}
        return {k: jax.device_put(v, self.shardings[k]) for k, v in arrays.items()}

    def describe(self) -> dict:
        return self.description


def class_balance(task: Task) -> dict[str, dict[str, int]]:
    """Examples per label in each split (of a multi-label task: examples that have the label)."""
    return {split: {name: Counter(label for e in examples for label in _labels_of(e.label))[name]
                    for name in task.label_names}
            for split, examples in task.splits.items()}
