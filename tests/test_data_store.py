"""Sources through TFDS, the packed token store (build, reuse, mismatch, bad input) and make_dataset."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cgpt_jax.data import corpus, default_data_config, make_dataset
from cgpt_jax.data.prepare import define_flags as define_data_flags, main as prepare_main, prepare
from cgpt_jax.data.store import MANIFEST, StoreError, build_or_reuse, open_store
from cgpt_jax.data.tokenizer import TokenizerError, parse_spec

VAL_FRACTION = 0.3
DOCS = [f"Document {i}: {'lorem ipsum ' * (i % 5 + 1)}dolor sit amet.\n" for i in range(24)]
JSONL_DOCS = ["A line of JSON text.", "Zweite Zeile: Grüße!"]


def write_corpus(root: pathlib.Path) -> pathlib.Path:
    """Good documents plus one of each bad input a real directory has."""
    for i, doc in enumerate(DOCS):
        path = root / ("nested/deeper" if i % 3 else "top") / f"doc{i}.{'md' if i % 2 else 'txt'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc)
    (root / "data.jsonl").write_text("\n".join([json.dumps({"text": JSONL_DOCS[0]}), "{not json",
                                                json.dumps({"other": 1}), json.dumps({"text": "  "}),
                                                "", json.dumps({"text": JSONL_DOCS[1]}),
                                                '{"text": "lone surrogate \\ud800 escaped"}']) + "\n")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # binary: skipped
    (root / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))  # invalid UTF-8: repaired
    (root / "empty.txt").write_text("\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("excluded by the default globs")
    (root / "table.csv").write_text("not,included\n")
    return root


def text_config(root: pathlib.Path, cache: pathlib.Path, tokenizer: str = "bytes"):
    cfg = default_data_config()
    cfg.source, cfg.text_dir, cfg.cache_dir = "text_dir", str(root), str(cache)
    cfg.tokenizer, cfg.val_fraction = tokenizer, VAL_FRACTION
    return cfg


def expected_docs(split: str) -> list[str]:
    texts = DOCS + JSONL_DOCS + ["caf\ufffd cr\ufffdme\n", "lone surrogate ? escaped"]
    return [t for t in texts if corpus.doc_split(t, VAL_FRACTION) == split]


def test_text_dir_store_counts_bad_input_and_places_eos(tmp_path):
    store = prepare(text_config(write_corpus(tmp_path / "corpus"), tmp_path / "cache"))
    counts = store.manifest["read"]["counts"]
    assert counts["binary_files_skipped"] == 1
    assert counts["invalid_utf8_files_repaired"] == 1
    assert counts["empty_documents_skipped"] == 2
    assert counts["jsonl_bad_lines_skipped"] == 2
    assert counts["invalid_utf8_documents_repaired"] == 1
    assert ".hidden/secret.txt" not in store.manifest["read"]["files"]
    assert "table.csv" not in store.manifest["read"]["files"]
    tokenizer = store.tokenizer()
    for split in ("train", "validation"):
        tokens = np.asarray(store.tokens(split))
        assert tokens[-1] == store.eos_id
        eos_at = np.flatnonzero(tokens == store.eos_id)
        docs = [tokenizer.decode(d) for d in np.split(tokens, eos_at + 1)[:-1]]
        assert all(d and store.eos_id not in tokenizer.encode(d) for d in docs)  # one EOS after each doc
        assert sorted(d.removesuffix("<|endoftext|>") for d in docs) == sorted(expected_docs(split))
        assert store.manifest["splits"][split]["documents"] == len(expected_docs(split))


def test_store_is_reused_and_a_changed_corpus_stops_with_nothing_deleted(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    cfg = text_config(root, tmp_path / "cache")
    first = prepare(cfg)
    stamp = (first.manifest["build"]["created_utc"], (first.path / "train.bin").stat().st_mtime_ns)
    again = prepare(cfg)
    assert again.path == first.path
    assert (again.manifest["build"]["created_utc"], (again.path / "train.bin").stat().st_mtime_ns) == stamp
    before = {p.name: p.read_bytes() for p in first.path.iterdir() if p.is_file()}
    (root / "top" / "doc0.txt").write_text("edited since the store was built\n")
    with pytest.raises(StoreError, match=r"changed 1 file\(s\), e.g. \['top/doc0.txt'\]"):
        prepare(cfg)
    assert {p.name: p.read_bytes() for p in first.path.iterdir() if p.is_file()} == before
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]  # no stray build dirs


def test_build_is_deterministic(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    a = prepare(text_config(root, tmp_path / "a", "bpe(vocab=300)")).manifest
    b = prepare(text_config(root, tmp_path / "b", "bpe(vocab=300)")).manifest
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    for split in ("train", "validation"):
        assert a["splits"][split]["sha256"] == b["splits"][split]["sha256"]


@pytest.mark.parametrize("files, message", [
    ({}, "no files match"),
    ({"notes.csv": b"a,b\n"}, "no files match"),
    ({"blob.txt": b"\0\1\2", "blank.txt": b"   \n"}, "hold no text documents"),
    ({"one.txt": b"a single document\n"}, "split of .* is empty"),
])
def test_bad_corpora_fail_before_anything_is_written(tmp_path, files, message):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    with pytest.raises(corpus.CorpusError, match=message):
        prepare(text_config(root, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_bad_config_fails_before_anything_is_written(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    with pytest.raises(corpus.CorpusError, match="not a directory"):
        prepare(text_config(tmp_path / "missing", tmp_path / "cache"))
    cfg = text_config(root, tmp_path / "cache")
    cfg.text_dir = ""
    with pytest.raises(corpus.CorpusError, match="text_dir is empty"):
        prepare(cfg)
    with pytest.raises(TokenizerError, match="is not a directory"):
        prepare(text_config(root, tmp_path / "cache", f"gpt2(dir={tmp_path / 'no-tokenizer'})"))
    cfg = text_config(root, tmp_path / "cache")
    cfg.val_fraction = 1.5
    with pytest.raises(corpus.CorpusError, match="val_fraction"):
        prepare(cfg)
    cfg.source = "hdf5"
    with pytest.raises(ValueError, match="source='hdf5'"):
        prepare(cfg)
    assert not (tmp_path / "cache").exists()


def test_foreign_and_damaged_store_directories_are_left_alone(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    cfg = text_config(root, tmp_path / "cache")
    source = corpus.TextDirSource(root, include=cfg.include, exclude=cfg.exclude, jsonl_text_key="text",
                                  val_fraction=VAL_FRACTION)
    final = tmp_path / "cache" / f"{source.slug}__{parse_spec('bytes').slug}"
    final.mkdir(parents=True)
    (final / "keep.txt").write_text("not ours")
    with pytest.raises(StoreError, match="not a complete store"):
        build_or_reuse(source, "bytes", tmp_path / "cache")
    assert (final / "keep.txt").read_text() == "not ours"

    store = prepare(text_config(root, tmp_path / "other-cache"))
    data = (store.path / "train.bin").read_bytes()
    (store.path / "train.bin").write_bytes(data[:-2])
    with pytest.raises(StoreError, match="damaged"):
        open_store(store.path)
    assert (store.path / "train.bin").read_bytes() == data[:-2] and (store.path / MANIFEST).exists()


def test_make_dataset_over_a_text_dir(tmp_path):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    cfg = text_config(write_corpus(tmp_path / "corpus"), tmp_path / "cache")
    cfg.eval_batches = 1
    dataset = make_dataset(cfg, seq_len=8, global_batch_size=8, seed=3, sharding=sharding)
    assert dataset.vocab_size == 257
    batch = dataset.train_batch(0)
    assert batch["inputs"].shape == (8, 8) and batch["inputs"].sharding == sharding
    assert np.array_equal(np.asarray(batch["inputs"])[:, 1:], np.asarray(batch["targets"])[:, :-1])
    assert len(list(dataset.eval_batches())) == 1
    assert dataset.describe()["store"].startswith(str(tmp_path / "cache"))


def test_prepare_command_line(tmp_path, capsys):
    root = write_corpus(tmp_path / "corpus")
    flag_values = flags.FlagValues()  # the command's flags, kept apart from this process's
    define_data_flags(flag_values)
    flag_values(["prepare", "--source=text_dir", f"--text_dir={root}", "--tokenizer=bytes", f"--cache_dir={tmp_path}",
                 f"--val_fraction={VAL_FRACTION}", "--include=*.txt,*.md"])
    prepare_main(["prepare"], flag_values)
    summary = json.loads(capsys.readouterr().out)
    assert summary["source"]["include"] == ["*.txt", "*.md"]
    assert summary["splits"]["train"]["tokens"] > 0


def test_stdlib_source_reads_the_running_interpreters_library():
    source = corpus.stdlib_source(0.02)
    files = source.relpaths()
    assert "os.py" in files and "json/decoder.py" in files
    assert not any(f.startswith(("site-packages/", "dist-packages/")) for f in files)
    assert source.slug.startswith("stdlib-py3.")


class CgptTinyCatalogText(tfds.core.GeneratorBasedBuilder):
    """A catalog-style TFDS dataset (registered by name) that builds from text in this file."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # downloads nothing (and so TFDS needs no `importlib_resources` to find checksums)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "title": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40), "test": self._generate_examples(10)}

    def _generate_examples(self, n: int):
        for i in range(n):
            yield i, {"text": f"Story {i} of {n}: once upon a time. " * 3, "title": f"Story {i}"}


def test_tfds_catalog_source_by_name(tmp_path):
    cfg = default_data_config()
    cfg.source, cfg.tokenizer, cfg.cache_dir = "tfds", "bytes", str(tmp_path / "cache")
    cfg.tfds_name, cfg.tfds_data_dir = "cgpt_tiny_catalog_text", str(tmp_path / "tfds")
    cfg.tfds_text_key, cfg.tfds_eval_split = "text", "test"
    with pytest.raises(corpus.CorpusError, match="not prepared"):
        prepare(cfg)
    cfg.tfds_download = True
    store = prepare(cfg)
    assert store.manifest["read"]["full_name"] == "cgpt_tiny_catalog_text/1.0.0"
    assert store.manifest["splits"]["train"]["documents"] == 40
    assert store.manifest["splits"]["validation"]["documents"] == 10
    tokens = np.asarray(store.tokens("validation"))
    docs = [store.tokenizer().decode(d) for d in np.split(tokens, np.flatnonzero(tokens == store.eos_id))[:-1]]
    assert sorted(d.removeprefix("<|endoftext|>") for d in docs) == sorted(
        f"Story {i} of 10: once upon a time. " * 3 for i in range(10))
    cfg.tfds_text_key = ""
    with pytest.raises(corpus.CorpusError, match="tfds_text_key"):
        prepare(cfg)
    cfg.tfds_text_key, cfg.tfds_eval_split = "text", "validation"
    with pytest.raises(corpus.CorpusError, match="no split"):
        prepare(cfg)
    cfg.tfds_name = "no_such_dataset_anywhere"
    with pytest.raises(corpus.CorpusError, match="not a TFDS dataset"):
        prepare(cfg)
