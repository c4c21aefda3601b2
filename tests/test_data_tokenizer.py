"""Tokenizer specs and files: GPT-2 (packaged and from a directory), any HF byte-level BPE, trained BPE, bytes."""
from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest
from tokenizers import Tokenizer, models

from cgpt_jax.data import tokenizer as tk

TEXTS = ["Hello world", "def f(x):\n    return x  # ünïcödé ✓ 🐍\n", "  tabs\tand\r\nnewlines ", "<|endoftext|>"]


def write_gpt2_style_files(directory: pathlib.Path) -> pathlib.Path:
    """A tiny GPT-2-style vocab.json + merges.txt: 256 byte symbols, three merges, <|endoftext|>."""
    symbols = tk.bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[tk.EOS] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


def test_gpt2_from_package_is_verified_and_matches_openai_ids():
    tok = tk.load_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eos_id) == (tk.GPT2_VOCAB_SIZE, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # An EOS string inside a document is text, not a document boundary.
    assert tok.eos_id not in tok.encode("a<|endoftext|>b")


def test_gpt2_package_with_a_wrong_hash_is_refused(monkeypatch):
    monkeypatch.setitem(tk.GPT2_SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(tk.TokenizerError, match="SHA-256"):
        tk.load_tokenizer("gpt2")


def test_gpt2_from_a_directory_must_equal_gpt2(tmp_path):
    encoder, merges = tk.packaged_gpt2_files()
    copy = tmp_path / "cerebras-gpt"
    copy.mkdir()
    shutil.copy(encoder, copy / "vocab.json")
    shutil.copy(merges, copy / "merges.txt")
    tok = tk.load_tokenizer(f"gpt2(dir={copy})")
    assert tok.encode("Hello world") == [15496, 995] and tok.eos_id == 50256
    # The same tokenizer as one tokenizer.json (the other layout of the HF repositories).
    as_json = tmp_path / "as-json"
    as_json.mkdir()
    tok.save(as_json / "tokenizer.json")
    assert tk.load_tokenizer(f"gpt2(dir={as_json})").encode(TEXTS[1]) == tok.encode(TEXTS[1])
    with pytest.raises(tk.TokenizerError, match="differ from GPT-2"):
        tk.load_tokenizer(f"gpt2(dir={write_gpt2_style_files(tmp_path / 'tiny')})")


def test_round_trip_on_gpt2_style_files_the_test_writes(tmp_path):
    tok = tk.load_tokenizer(f"hf(dir={write_gpt2_style_files(tmp_path / 'tiny')})")
    assert (tok.vocab_size, tok.eos_id) == (260, 259)
    assert tok.encode("hello") == [258, ord("o")]  # 'he' + 'll' -> 'hell', then a plain byte
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_bad_tokenizer_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tk.TokenizerError, match="neither tokenizer.json nor vocab.json"):
        tk.load_tokenizer(f"hf(dir={empty})")
    with pytest.raises(tk.TokenizerError, match="is not a directory"):
        tk.load_tokenizer(f"gpt2(dir={tmp_path / 'missing'})")
    broken = write_gpt2_style_files(tmp_path / "broken")
    (broken / "vocab.json").write_text('{"a": 0,')
    with pytest.raises(tk.TokenizerError, match="cannot read"):
        tk.load_tokenizer(f"hf(dir={broken})")
    gaps = write_gpt2_style_files(tmp_path / "gaps")
    vocab = json.loads((gaps / "vocab.json").read_text())
    vocab["x"] = 1000
    (gaps / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(tk.TokenizerError, match="gaps"):
        tk.load_tokenizer(f"hf(dir={gaps})")
    no_eos = tmp_path / "no-eos"
    no_eos.mkdir()
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(no_eos / "tokenizer.json"))
    with pytest.raises(tk.TokenizerError, match=re.escape("has no '<|endoftext|>'")):
        tk.load_tokenizer(f"hf(dir={no_eos})")


@pytest.mark.parametrize("spec, message", [
    ("sentencepiece", "not a tokenizer spec"),
    ("bpe", "needs"),
    ("bpe(vocab=100)", ">= 257"),
    ("bpe(vocab=big)", ">= 257"),
    ("gpt2(vocab=5)", "not valid for 'gpt2'"),
    ("hf", "needs"),
])
def test_bad_specs(spec, message):
    with pytest.raises(tk.TokenizerError, match=message):
        tk.parse_spec(spec)


def test_bytes_tokenizer_round_trip():
    tok = tk.load_tokenizer("bytes")
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("hé") == list("hé".encode())
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_trained_bpe_is_deterministic_and_round_trips():
    corpus = [f"def function_{i}(value):\n    return value * {i} + offset\n" for i in range(200)]
    first = tk.build_tokenizer("bpe(vocab=300)", lambda: iter(corpus))
    second = tk.build_tokenizer("bpe(vocab=300)", lambda: iter(corpus))
    assert first.sha256 == second.sha256
    assert first.vocab_size == 300
    assert len(first.encode(corpus[0])) < len(corpus[0].encode()) / 2  # it learned merges
    for text in TEXTS + corpus[:3]:
        assert first.decode(first.encode(text)) == text


def test_spec_slugs_differ_per_spec_and_name_dirs_by_path(tmp_path):
    slugs = {tk.parse_spec(s).slug for s in ["gpt2", "bytes", "bpe(vocab=512)", "bpe(vocab=1024)",
                                             f"hf(dir={tmp_path / 'a'})", f"hf(dir={tmp_path / 'b'})"]}
    assert len(slugs) == 6
    assert all("/" not in slug for slug in slugs)
