"""Text sources, read through tensorflow-datasets (array_record files, no TensorFlow needed).

* `TextDirSource`: a local directory of text (.txt/.md/.py/... files, and .jsonl with one document
  per line), walked recursively with include/exclude globs and split into train/validation by a hash
  of each document's text (so duplicates always land in the same split). `source='stdlib'` is this
  source over the running interpreter's standard library: every Python installation has it.
* `TfdsSource`: a dataset of the TFDS catalog by name (`lm1b`, `c4/en`, `tiny_shakespeare`, `pg19`),
  read from its prepared array_record files.

A source gives the token store three things: `slug` (a store-directory name), `identity()` (what must
match for a built store to be reused) and `documents(split)` (the texts, after `materialize`).
"""
from __future__ import annotations

import collections
import fnmatch
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import sysconfig
from typing import Counter, Iterator

import tensorflow_datasets as tfds

from cgpt_jax import storage
from cgpt_jax.errors import InputError

SPLITS = ("train", "validation")
STDLIB_INCLUDE = ("*.py",)
STDLIB_EXCLUDE = ("site-packages/*", "dist-packages/*", ".*", "*/.*")
_BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (git's rule)
_DOCS_PER_READ = 256

log = logging.getLogger(__name__)


class CorpusError(InputError):
    """A corpus that cannot be read as configured; the message says how to fix it."""


def _short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40] or "corpus"


def matches(relpath: str, patterns: tuple[str, ...]) -> bool:
    """fnmatch on the '/'-separated path relative to the root; '*' also crosses '/' ('*.py' = any depth)."""
    return any(fnmatch.fnmatchcase(relpath, p) for p in patterns)


def doc_split(text: str, val_fraction: float) -> str:
    """'validation' for a fixed `val_fraction` of documents, chosen by the hash of their text."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return "validation" if h < val_fraction * 2**64 else "train"


def _decode(data: bytes) -> tuple[str, bool]:
    """Text of `data`, invalid UTF-8 replaced by U+FFFD; and whether anything was replaced."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


class TextDirSource:
    """A directory of text files; see the module docstring."""

    def __init__(self, root: str | pathlib.Path, *, include: tuple[str, ...], exclude: tuple[str, ...],
                 jsonl_text_key: str, val_fraction: float, kind: str = "text_dir"):
        if not str(root):
            raise CorpusError("config.data.text_dir is empty; set it to a directory of text files")
        self.root = pathlib.Path(root).expanduser().resolve()
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.jsonl_text_key = jsonl_text_key
        self.val_fraction = val_fraction
        self.kind = kind
        if not 0 < val_fraction < 1:
            raise CorpusError(f"config.data.val_fraction={val_fraction} must be in (0, 1), e.g. 0.02")
        if not self.root.is_dir():
            raise CorpusError(f"config.data.text_dir={str(root)!r} is not a directory")
        self._work_dir: pathlib.Path | None = None

    @property
    def slug(self) -> str:
        params = (str(self.root), self.include, self.exclude, self.jsonl_text_key, self.val_fraction)
        if self.kind == "stdlib":
            return f"stdlib-py{sysconfig.get_python_version()}.{sys.version_info.micro}-{_short_hash(*params)}"
        return f"text-{_sanitize(self.root.name)}-{_short_hash(*params)}"

    def relpaths(self) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):  # symlinked dirs are not followed
            dirnames.sort()
            for name in sorted(filenames):
                rel = pathlib.Path(dirpath, name).relative_to(self.root).as_posix()
                if matches(rel, self.include) and not matches(rel, self.exclude):
                    found.append(rel)
        return found

    def _file_documents(self, rel: str, data: bytes, counts: Counter[str]) -> Iterator[tuple[str, str]]:
        """(key, text) of each document of one file; skipped and repaired input is counted."""
        if b"\0" in data[:_BINARY_SNIFF_BYTES]:
            counts["binary_files_skipped"] += 1
            return
        text, replaced = _decode(data)
        counts["files_read"] += 1
        counts["invalid_utf8_files_repaired"] += replaced
        if not rel.endswith(".jsonl"):
            if text.strip():
                yield rel, text
            else:
                counts["empty_documents_skipped"] += 1
            return
        for line_no, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[self.jsonl_text_key]
                if not isinstance(doc, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError, IndexError):
                counts["jsonl_bad_lines_skipped"] += 1
                continue
            if not doc.isascii():  # JSON escapes can encode lone surrogates, which UTF-8 cannot hold
                repaired = doc.encode("utf-8", errors="replace").decode("utf-8")
                counts["invalid_utf8_documents_repaired"] += repaired != doc
                doc = repaired
            if doc.strip():
                yield f"{rel}:{line_no}", doc
            else:
                counts["empty_documents_skipped"] += 1

    def documents_with_paths(self) -> Iterator[tuple[str, str, str]]:
        """(key, relpath, text) of every document, in path order (`scan` has counted what is skipped)."""
        for rel in self.relpaths():
            for key, text in self._file_documents(rel, (self.root / rel).read_bytes(), collections.Counter()):
                yield key, rel, text

    @functools.cached_property
    def scan(self) -> dict:
        """Read everything once, before anything is written: fingerprint, counts, and input errors."""
        counts: Counter[str] = collections.Counter()
        files: dict[str, str] = {}
        fingerprint = hashlib.sha256()
        docs = collections.Counter()
        for rel in self.relpaths():
            data = (self.root / rel).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            files[rel] = digest[:16]
            fingerprint.update(f"{rel}\0{digest}\n".encode())
            counts["bytes_matched"] += len(data)
            for _, text in self._file_documents(rel, data, counts):
                docs[doc_split(text, self.val_fraction)] += 1
        where = f"{self.root} (include={list(self.include)}, exclude={list(self.exclude)})"
        if not files:
            raise CorpusError(f"no files match in {where}; check config.data.text_dir and the globs")
        if not sum(docs.values()):
            raise CorpusError(f"the {len(files)} files matching in {where} hold no text documents "
                              f"(counts: {dict(counts)})")
        for split in SPLITS:
            if not docs[split]:
                raise CorpusError(
                    f"the {split} split of {where} is empty ({sum(docs.values())} documents, "
                    f"val_fraction={self.val_fraction}); add documents or change config.data.val_fraction")
        return {"fingerprint": fingerprint.hexdigest(), "files": files, "counts": dict(counts),
                "documents": dict(docs)}

    def identity(self) -> dict:
        """What a reusable store must have been built from (the root may move; the content may not)."""
        return {"kind": self.kind, "include": list(self.include), "exclude": list(self.exclude),
                "jsonl_text_key": self.jsonl_text_key, "val_fraction": self.val_fraction,
                "fingerprint": self.scan["fingerprint"], "n_files": len(self.scan["files"])}

    def record(self) -> dict:
        """What was read, for the manifest."""
        extra = {"python": sys.version.split()[0]} if self.kind == "stdlib" else {}
        return {"root": str(self.root), **extra, **self.scan}

    def materialize(self, work_dir: pathlib.Path) -> None:
        """Write the documents as a TFDS array_record dataset under `work_dir`."""
        skipped = {k: v for k, v in self.scan["counts"].items() if k.endswith(("skipped", "repaired")) and v}
        if skipped:
            log.warning("corpus %s: %s (counted in the store's manifest)", self.root, skipped)
        builder = LocalTextCorpus(source=self, data_dir=str(work_dir / "tfds"), file_format="array_record")
        builder.download_and_prepare()
        self._work_dir = work_dir

    def documents(self, split: str, counts: Counter[str] | None = None) -> Iterator[str]:
        assert self._work_dir is not None, "materialize() first"
        builder = tfds.builder_from_directory(str(self._work_dir / "tfds" / LocalTextCorpus.name /
                                                  str(LocalTextCorpus.VERSION)))
        yield from _read_texts(builder.as_data_source(split), "text", counts)


class LocalTextCorpus(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over a `TextDirSource`: splits 'train' and 'validation', features text and path."""

    VERSION = tfds.core.Version("1.0.0")
    # Nothing is downloaded. Also keeps TFDS from looking up a checksums file beside this module,
    # which imports `importlib_resources` (not installed on Python >= 3.9).
    url_infos = None

    def __init__(self, *, source: TextDirSource, **kwargs):
        self._source = source
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text documents under {self._source.root}",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        for key, rel, text in self._source.documents_with_paths():
            if doc_split(text, self._source.val_fraction) == split:
                yield key, {"text": text, "path": rel}


def _read_texts(data_source, text_key: str, counts: Counter[str] | None) -> Iterator[str]:
    """Texts of a TFDS data source in record order, read in batches; empty ones are skipped."""
    counts = counts if counts is not None else collections.Counter()
    for start in range(0, len(data_source), _DOCS_PER_READ):
        records = data_source.__getitems__(range(start, min(start + _DOCS_PER_READ, len(data_source))))
        for record in records:
            value = record[text_key]
            if isinstance(value, bytes):
                value, replaced = _decode(value)
                counts["invalid_utf8_documents_repaired"] += replaced
            if value.strip():
                counts["documents"] += 1
                yield value
            else:
                counts["empty_documents_skipped"] += 1


def stdlib_source(val_fraction: float) -> TextDirSource:
    """The running interpreter's standard library (.py files, its test suite included)."""
    return TextDirSource(sysconfig.get_paths()["stdlib"], include=STDLIB_INCLUDE, exclude=STDLIB_EXCLUDE,
                         jsonl_text_key="text", val_fraction=val_fraction, kind="stdlib")


class TfdsSource:
    """A TFDS catalog dataset by name, prepared as array_record in `data_dir`."""

    def __init__(self, name: str, *, data_dir: str, text_key: str, train_split: str, eval_split: str,
                 download: bool):
        if not name:
            raise CorpusError("config.data.tfds_name is empty; set it to a TFDS name such as 'lm1b'")
        self.name = name
        self.data_dir = str(storage.path(data_dir)) if data_dir else None  # TFDS reads gs:// itself
        self.text_key = text_key
        self.splits = {"train": train_split, "validation": eval_split}
        self.download = download
        self._builder = None

    @property
    def slug(self) -> str:
        return f"tfds-{_sanitize(self.name)}-{_short_hash(self.name, self.data_dir, self.text_key, self.splits)}"

    def identity(self) -> dict:
        # TFDS versions are immutable, so the name is the content's identity.
        return {"kind": "tfds", "name": self.name, "text_key": self.text_key, "splits": self.splits}

    def record(self) -> dict:
        info = self._builder.info
        return {"full_name": info.full_name, "data_dir": str(self._builder.data_dir),
                "text_key": self._text_key(), "file_format": info.file_format.value,
                "split_examples": {s: info.splits[name].num_examples for s, name in self.splits.items()}}

    def _text_key(self) -> str:
        features = self._builder.info.features
        if self.text_key:
            if self.text_key not in features:
                raise CorpusError(f"TFDS dataset {self.name!r} has no feature {self.text_key!r} "
                                  f"(it has {sorted(features)}); fix config.data.tfds_text_key")
            return self.text_key
        text_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
        if len(text_keys) != 1:
            raise CorpusError(f"TFDS dataset {self.name!r} has text features {text_keys} among "
                              f"{sorted(features)}; set config.data.tfds_text_key to the one to train on")
        return text_keys[0]

    def materialize(self, work_dir: pathlib.Path) -> None:
        """Find (or, with tfds_download=True, generate) the prepared dataset; check its splits."""
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise CorpusError(f"config.data.tfds_name={self.name!r} is not a TFDS dataset ({e}); "
                              "see tfds.list_builders()") from e
        if not builder.is_prepared():
            if not self.download:
                raise CorpusError(
                    f"TFDS dataset {self.name!r} is not prepared in {builder.data_dir}; set "
                    "config.data.tfds_download=True (needs network) or config.data.tfds_data_dir to where "
                    "it was prepared with file_format='array_record'")
            try:
                builder.download_and_prepare(file_format="array_record")
            except ModuleNotFoundError as e:
                raise CorpusError(
                    f"generating TFDS dataset {self.name!r} needs the module {e.name!r}, which TFDS "
                    f"imports only for generation: pip install {e.name.replace('_', '-')} "
                    "(tensorflow-cpu for 'tensorflow'); reading a prepared array_record dataset needs neither"
                ) from e
        if builder.info.file_format not in tfds.core.file_adapters.FileFormat.with_random_access():
            raise CorpusError(
                f"TFDS dataset {self.name!r} in {builder.data_dir} is stored as "
                f"{builder.info.file_format.value}, "
                "which needs TensorFlow to read; prepare it again with file_format='array_record' "
                "(tfds build NAME --file_format=array_record) into config.data.tfds_data_dir")
        missing = [name for name in self.splits.values() if name not in builder.info.splits]
        if missing:
            raise CorpusError(f"TFDS dataset {self.name!r} has no split {missing} (it has "
                              f"{sorted(builder.info.splits)}); set config.data.tfds_train_split/tfds_eval_split")
        self._builder = builder
        self._text_key()

    def documents(self, split: str, counts: Counter[str] | None = None) -> Iterator[str]:
        assert self._builder is not None, "materialize() first"
        yield from _read_texts(self._builder.as_data_source(self.splits[split]), self._text_key(), counts)
