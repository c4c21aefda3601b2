"""Input pipeline: every source yields the global batch of step s as a pure function of (seed, s).

`make_dataset(data_cfg, ...)` is the one entry point the training loop calls; it returns a `Dataset`.

Sources (`config.data.source`):
  'synthetic'  a learnable Markov chain, for tests and smoke runs (no files).
  'stdlib'     the running interpreter's standard library (.py files, ~34 MB on a full install):
               real text that every fresh machine has offline: the main job's corpus.
  'text_dir'   any local directory of text: `text_dir`, `include`/`exclude` globs, .jsonl support.
  'tfds'       a TFDS catalog dataset by name (`tfds_name`), read from prepared array_record files.
The real sources are tokenized once (`tokenizer`, see cgpt_jax/data/tokenizer.py) into a packed
token store under `cache_dir` (cgpt_jax/data/store.py) and read by the loader (loader.py).
See docs/data.md.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import jax
import ml_collections

from cgpt_jax.data.assemble import Batch
from cgpt_jax.data.synthetic import SyntheticMarkov


class Dataset(Protocol):
    vocab_size: int  # the tokenizer's vocabulary; the model's vocabulary follows it

    def train_batch(self, step: int) -> Batch:
        """The global training batch of `step`, sharded like the `sharding` given at construction."""

    def eval_batches(self) -> Iterator[Batch]:
        """A fixed set of validation batches (the same ones at every evaluation)."""

    def describe(self) -> dict:
        """What was read, for config.json and the run's logs."""


def default_data_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.source = "synthetic"  # 'synthetic' | 'stdlib' | 'text_dir' | 'tfds' (see the module docstring)
    cfg.synthetic_vocab_size = 256
    cfg.eval_batches = 4  # fixed validation batches per evaluation (fewer if the split is small)
    cfg.prefetch = 2  # train steps prepared ahead in a background thread
    # Real corpora: tokenized once into a store under cache_dir, reused while its manifest matches.
    cfg.tokenizer = "bpe(vocab=1024)"  # 'gpt2' | 'gpt2(dir=PATH)' | 'hf(dir=PATH)' | 'bpe(vocab=N)' | 'bytes'
    cfg.cache_dir = "~/.cache/cgpt_jax/data"
    cfg.val_fraction = 0.02  # stdlib / text_dir: share of documents (by text hash) in validation
    cfg.text_dir = ""  # source='text_dir': the directory, read recursively
    cfg.include = ("*.txt", "*.md", "*.rst", "*.py", "*.jsonl")  # globs on the relative path; '*' crosses '/'
    cfg.exclude = (".*", "*/.*")  # hidden files and directories
    cfg.jsonl_text_key = "text"  # .jsonl files: one JSON object per line, its text under this key
    cfg.tfds_name = ""  # source='tfds': e.g. 'lm1b', 'c4/en', 'tiny_shakespeare', 'pg19'
    cfg.tfds_data_dir = ""  # '' = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    cfg.tfds_text_key = ""  # '' = the dataset's only Text feature
    cfg.tfds_train_split = "train"
    cfg.tfds_eval_split = "validation"
    cfg.tfds_download = False  # True lets TFDS download and generate it (network; often TensorFlow)
    return cfg


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    sharding: jax.sharding.NamedSharding,
) -> Dataset:
    if data_cfg.source == "synthetic":
        return SyntheticMarkov(
            vocab_size=data_cfg.synthetic_vocab_size,
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            seed=seed,
            sharding=sharding,
            n_eval_batches=data_cfg.eval_batches,
        )
    # Imported here: TFDS and tokenizers load only for real corpora.
    from cgpt_jax.data.loader import PackedTokens
    from cgpt_jax.data.prepare import prepare

    store = prepare(data_cfg)
    return PackedTokens(
        store.tokens("train"),
        store.tokens("validation"),
        vocab_size=store.vocab_size,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        sharding=sharding,
        n_eval_batches=data_cfg.eval_batches,
        prefetch=data_cfg.prefetch,
        description={"source": data_cfg.source, "store": str(store.path),
                     "tokenizer": store.manifest["tokenizer"]["spec"],
                     "source_identity": store.manifest["source"]},
    )
