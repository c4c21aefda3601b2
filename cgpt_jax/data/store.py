"""The packed token store: every document tokenized once, followed by EOS, concatenated per split.

A store is one directory `<cache_dir>/<source slug>__<tokenizer slug>/` holding

    manifest.json      what it was built from (compared on reuse), what was read, token counts, hashes
    tokenizer.json     the tokenizer (also a trained one), loadable with HF `tokenizers`
    train.bin          the train split's tokens, raw little-endian uint16 (uint32 if vocab > 65536)
    validation.bin     the validation split's tokens
    tfds/              for local text: the documents as a TFDS array_record dataset

One memory-mapped file per split (rather than many shards) keeps windowing trivial: any window of
seq_len+1 tokens is one slice, whichever process reads it.

A store is built in a temporary sibling directory and renamed into place when complete, so a
directory with a manifest is always whole. It is reused when its manifest's identity matches the
config; on a mismatch (e.g. the corpus changed) building stops with an error and nothing is deleted.

`cache_dir` may be a bucket (gs://, s3://). The token files are memory-mapped, so a bucket's store is read
through a local copy under $CGPT_JAX_STORE_MIRROR (default ~/.cache/cgpt_jax/token_stores), downloaded once
per host and checked against the manifest's sizes and hashes. A store is built locally and uploaded with its
manifest last: an object store has no rename, so there the manifest is the commit marker.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Iterator, Protocol

import numpy as np
import tokenizers
import tqdm

from cgpt_jax import storage
from cgpt_jax.data.corpus import SPLITS
from cgpt_jax.data.tokenizer import TextTokenizer, build_tokenizer, load_tokenizer, parse_spec, tokenizer_from_file

FORMAT = "cgpt_jax.token_store/1"
MANIFEST = "manifest.json"
_ENCODE_BATCH_CHARS = 4 << 20  # texts handed to the tokenizer at once: big enough for all cores

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A store that cannot be used as configured; the message says how to fix it."""


class Source(Protocol):
    slug: str

    def identity(self) -> dict: ...

    def record(self) -> dict: ...

    def materialize(self, work_dir: pathlib.Path) -> None: ...

    def documents(self, split: str, counts: collections.Counter | None = None) -> Iterator[str]: ...


@dataclasses.dataclass(frozen=True)
class TokenStore:
    path: pathlib.Path
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.manifest["tokenizer"]["eos_id"]

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped read-only (pages are read on first touch)."""
        info = self.manifest["splits"][split]
        return np.memmap(self.path / info["file"], dtype=self.manifest["dtype"], mode="r", shape=(info["tokens"],))

    def tokenizer(self) -> TextTokenizer:
        return tokenizer_from_file(self.path / "tokenizer.json", self.manifest["tokenizer"]["spec"])


def open_store(path: str | pathlib.Path) -> TokenStore:
    path = pathlib.Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is not a readable token store ({e}); build one with "
                         "python -m cgpt_jax.data.prepare") from e
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT!r}; "
                         "build a new store (another config.data.cache_dir)")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for info in manifest["splits"].values():
        file = path / info["file"]
        size = file.stat().st_size if file.exists() else -1
        if size != info["tokens"] * itemsize:
            raise StoreError(f"{file} has {size} bytes, the manifest says {info['tokens']} tokens of "
                             f"{itemsize} bytes: the store is damaged. It is left as it is; build a new one "
                             "under another config.data.cache_dir")
    return TokenStore(path, manifest)


def _tokenizer_identity(spec: str) -> dict:
    parsed = parse_spec(spec)
    identity = {"spec": parsed.canonical}
    if not parsed.needs_training:  # file-based tokenizers: their content must match too
        identity["sha256"] = load_tokenizer(parsed.canonical).sha256
    return identity


def _identity_diffs(have: dict, want: dict, prefix: str = "") -> list[str]:
    """Human-readable differences for every field of `want` that `have` does not match."""
    diffs = []
    for key, value in want.items():
        old = have.get(key) if isinstance(have, dict) else None
        if isinstance(value, dict):
            diffs += _identity_diffs(old or {}, value, f"{prefix}{key}.")
        elif old != value:
            diffs.append(f"{prefix}{key}: store has {old!r}, config/corpus now gives {value!r}")
    return diffs


def _file_diffs(old: dict[str, str], new: dict[str, str], limit: int = 5) -> list[str]:
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    return [f"{what} {len(paths)} file(s), e.g. {paths[:limit]}"
            for what, paths in (("added", added), ("removed", removed), ("changed", changed)) if paths]


def _check_reusable(path: pathlib.Path | storage.Path, want: dict, source: Source,
                    manifest: dict | None = None) -> None:
    manifest = manifest if manifest is not None else open_store(path).manifest
    diffs = _identity_diffs(manifest, want)
    if not diffs:
        return
    old_files = manifest.get("read", {}).get("files")
    new_files = source.record().get("files") if old_files is not None else None
    details = _file_diffs(old_files, new_files) if new_files is not None else []
    raise StoreError(
        f"the token store {path} was built from other input than the config now gives:\n  "
        + "\n  ".join(diffs + details)
        + f"\nIt is not deleted or changed. To build a store for the current input, move {path} away "
        "or set config.data.cache_dir to another directory; to use the old store, restore its input.")


def _text_batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_split(tokenizer: TextTokenizer, texts: Iterator[str], path: pathlib.Path, dtype: np.dtype,
                 desc: str) -> dict:
    """Tokenize `texts` into `path` as doc_0 EOS doc_1 EOS ...; returns the split's manifest entry."""
    digest, n_tokens, n_docs = hashlib.sha256(), 0, 0
    with open(path, "wb") as f, tqdm.tqdm(desc=desc, unit="B", unit_scale=True, disable=None) as bar:
        for batch in _text_batches(texts):
            ids = tokenizer.encode_batch(batch)
            count = sum(map(len, ids)) + len(ids)
            flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(doc, (tokenizer.eos_id,))
                                                             for doc in ids), dtype=dtype, count=count)
            data = flat.tobytes()
            f.write(data)
            digest.update(data)
            n_tokens += count
            n_docs += len(batch)
            bar.update(sum(map(len, batch)))
    return {"file": path.name, "tokens": n_tokens, "documents": n_docs, "sha256": digest.hexdigest()}


def _build(source: Source, spec: str, work: pathlib.Path, want: dict) -> dict:
    start = time.time()
    source.materialize(work)
    tokenizer = build_tokenizer(spec, lambda: source.documents("train"))
    tokenizer.save(work / "tokenizer.json")
    dtype = np.dtype("<u2" if tokenizer.vocab_size <= 1 << 16 else "<u4")  # little-endian on every host
    splits, counts = {}, {}
    for split in SPLITS:
        split_counts = collections.Counter()
        splits[split] = _write_split(tokenizer, source.documents(split, split_counts), work / f"{split}.bin",
                                     dtype, desc=f"tokenizing {split}")
        counts[split] = dict(split_counts)
    for split, info in splits.items():
        if info["tokens"] == 0:
            raise StoreError(f"the {split} split has no text to tokenize; check the corpus and its splits")
    return {
        **want,
        "tokenizer": {**want["tokenizer"], **tokenizer.describe()},
        "dtype": dtype.str,
        "splits": {s: {**splits[s], "read": counts[s]} for s in SPLITS},
        "read": source.record(),
        "build": {
            "seconds": round(time.time() - start, 2),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "tokenizers": tokenizers.__version__,
        },
    }


def build_or_reuse(source: Source, tokenizer_spec: str, cache_dir: str | pathlib.Path) -> TokenStore:
    """The store for (source, tokenizer) under `cache_dir`: reused if its manifest matches, else built.

    Every input check (tokenizer spec and files, corpus scan) runs before anything is written.
    """
    if storage.is_remote(cache_dir):
        return _build_or_reuse_in_bucket(source, tokenizer_spec, str(cache_dir))
    spec = parse_spec(tokenizer_spec)
    cache_dir = pathlib.Path(cache_dir).expanduser().resolve()
    final = cache_dir / f"{source.slug}__{spec.slug}"
    want = {"format": FORMAT, "source": source.identity(), "tokenizer": _tokenizer_identity(spec.canonical)}
    if (final / MANIFEST).exists():
        _check_reusable(final, want, source)
        log.info("reusing token store %s", final)
        return open_store(final)
    if final.exists():
        raise StoreError(f"{final} exists but has no {MANIFEST}, so it is not a complete store; it is left "
                         "as it is: move it away or set config.data.cache_dir to another directory")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the final place, under a name no other process uses, then rename it in at once.
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=cache_dir))
    try:
        manifest = _build(source, spec.canonical, work, want)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(work, final)
        except OSError:
            if not (final / MANIFEST).exists():
                raise
            _check_reusable(final, want, source)  # another process built the same store first
        else:
            log.info("built token store %s in %.1f s: %s", final, manifest["build"]["seconds"],
                     {s: v["tokens"] for s, v in manifest["splits"].items()})
    finally:
        if work.exists():
            shutil.rmtree(work)  # only this call's own unfinished (or duplicate) work
    return open_store(final)


def _mirror(remote: storage.Path) -> pathlib.Path:
    """Where this host keeps its copy of the bucket's store `remote`."""
    root = pathlib.Path(os.environ.get("CGPT_JAX_STORE_MIRROR", "~/.cache/cgpt_jax/token_stores")).expanduser()
    return root / storage.scheme(remote) / str(remote).split("://", 1)[1]


def _files(directory: storage.Path) -> Iterator[storage.Path]:
    for entry in directory.iterdir():
        if entry.is_dir():
            yield from _files(entry)
        else:
            yield entry


def _download(remote: storage.Path, local: pathlib.Path) -> TokenStore:
    """The local copy of the bucket's store: reused while its manifest is the bucket's, else fetched anew
    (into a temporary sibling, checked against the manifest's sizes and hashes, then renamed into place)."""
    manifest_bytes = (remote / MANIFEST).read_bytes()
    if (local / MANIFEST).exists() and (local / MANIFEST).read_bytes() == manifest_bytes:
        return open_store(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{local.name}.download-", dir=local.parent))
    try:
        for file in _files(remote):
            target = work / str(file)[len(str(remote)) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
        store = open_store(work)  # sizes
        for info in store.manifest["splits"].values():
            if hashlib.sha256((work / info["file"]).read_bytes()).hexdigest() != info["sha256"]:
                raise StoreError(f"{remote / info['file']} differs from its manifest's sha256: the store in the "
                                 f"bucket is damaged. It is left as it is; build a new one under another "
                                 f"config.data.cache_dir")
        if local.exists():
            shutil.rmtree(local)  # a copy of an older manifest: the bucket's store was replaced
        os.rename(work, local)
    finally:
        if work.exists():
            shutil.rmtree(work)
    log.info("downloaded token store %s to %s", remote, local)
    return open_store(local)


def _build_or_reuse_in_bucket(source: Source, tokenizer_spec: str, cache_dir: str) -> TokenStore:
    spec = parse_spec(tokenizer_spec)
    storage.check_workdir(cache_dir, "config.data.cache_dir")
    remote = storage.path(cache_dir, f"{source.slug}__{spec.slug}")
    want = {"format": FORMAT, "source": source.identity(), "tokenizer": _tokenizer_identity(spec.canonical)}
    local = _mirror(remote)
    if not (remote / MANIFEST).exists():
        if remote.exists():
            raise StoreError(f"{remote} exists but has no {MANIFEST}, so it is not a complete store (an upload "
                             "was interrupted); it is left as it is: move it away or set config.data.cache_dir "
                             "to another place")
        built = build_or_reuse(source, tokenizer_spec, local.parent)  # locally, then uploaded
        for file in sorted(built.path.rglob("*"), key=lambda f: f.name == MANIFEST):  # the manifest last
            if file.is_file():
                target = remote / file.relative_to(built.path).as_posix()
                target.write_bytes(file.read_bytes())
        log.info("uploaded token store %s to %s", built.path, remote)
    _check_reusable(remote, want, source, json.loads((remote / MANIFEST).read_text()))
    return _download(remote, local)
