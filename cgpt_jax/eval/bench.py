"""Scoring speed against lm-eval's own `hf` backend: the same checkpoint, the same requests, one process.

    python -m cgpt_jax.eval.bench [--d_model=256 --n_layers=4 --n_heads=8 --vocab=2048 --positions=256]
        [--docs=100] [--batch_size=32] [--repeats=2]

Builds a random GPT-2 (every weight perturbed) with a byte-level BPE trained on the held-out standard
library, saved as an HF directory that both backends load, and the requests of the offline next-line
task (`cgpt_stdlib_nextline`: 4 per document). Each backend's `loglikelihood` is then timed on all
requests, taking turns; the first round includes cgpt_jax's compiles and is reported apart. Also prints
the largest difference between the two backends' log-likelihoods.
"""
from __future__ import annotations

import pathlib
import random
import statistics
import tempfile
import time

from absl import app, flags

from cgpt_jax import cli

EOT = "<|endoftext|>"


def random_hf_checkpoint(directory: pathlib.Path, text: str, *, vocab: int, d_model: int, n_layers: int,
                         n_heads: int, positions: int, seed: int = 0) -> None:
    """Write a random GPT2LMHeadModel and a byte-level BPE tokenizer of `vocab` tokens trained on `text`
    (with <|endoftext|> as bos/eos/unk) into `directory`; needs torch and transformers."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainer=trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT],
                                                                show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT,
                                                     unk_token=EOT)
    tokenizer.save_pretrained(directory)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=d_model,
                                     n_layer=n_layers, n_head=n_heads, activation_function="gelu",
                                     bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():  # random biases and LayerNorms too, not just the matrices
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from cgpt_jax.eval.harness import CgptJaxLM
    from cgpt_jax.eval.tasks import heldout_files, nextline_docs

    f = flags.FLAGS
    files = heldout_files()
    docs = list(nextline_docs(files, f.docs, random.Random(0)))
    requests = [Instance("loglikelihood", doc, (doc["context"], choice), i)
                for doc in docs for i, choice in enumerate(doc["choices"])]
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        random_hf_checkpoint(directory, "".join(text for _, text in files), vocab=f.vocab, d_model=f.d_model,
                             n_layers=f.n_layers, n_heads=f.n_heads, positions=f.positions)
        backends = {"cgpt_jax": CgptJaxLM(hf=str(directory), batch_size=f.batch_size),
                    "lm-eval hf": HFLM(pretrained=str(directory), device="cpu", batch_size=f.batch_size,
                                       dtype="float32")}
        times: dict[str, list[float]] = {name: [] for name in backends}
        results = {}
        for _ in range(f.repeats + 1):
            for name, backend in backends.items():
                start = time.perf_counter()
                results[name] = backend.loglikelihood(requests)
                times[name].append(time.perf_counter() - start)
    n = len(requests)
    print(f"{n} loglikelihood requests ({len(docs)} next-line documents), model d={f.d_model} layers={f.n_layers} "
          f"vocab={f.vocab} positions={f.positions}, batch {f.batch_size}")
    print("| backend | first round (s) | median of the next (s) | requests/s |")
    print("| --- | --- | --- | --- |")
    rates = {}
    for name, measured in times.items():
        median = statistics.median(measured[1:])
        rates[name] = n / median
        print(f"| {name} | {measured[0]:.2f} | {median:.2f} | {rates[name]:.1f} |")
    print(f"speed-up: {rates['cgpt_jax'] / rates['lm-eval hf']:.2f}x")
    difference = max(abs(a[0] - b[0]) for a, b in zip(results["cgpt_jax"], results["lm-eval hf"]))
    same_greedy = all(a[1] == b[1] for a, b in zip(results["cgpt_jax"], results["lm-eval hf"]))
    print(f"max |log-likelihood difference| {difference:.2e}; is_greedy identical: {same_greedy}")


if __name__ == "__main__":
    flags.DEFINE_integer("d_model", 256, "Width.")
    flags.DEFINE_integer("n_layers", 4, "Layers.")
    flags.DEFINE_integer("n_heads", 8, "Attention heads.")
    flags.DEFINE_integer("vocab", 2048, "Tokenizer (and vocabulary) size.")
    flags.DEFINE_integer("positions", 256, "Context length.")
    flags.DEFINE_integer("docs", 100, "Next-line documents (4 requests each).")
    flags.DEFINE_integer("batch_size", 32, "Rows per batch, both backends.")
    flags.DEFINE_integer("repeats", 2, "Timed rounds after the first.")
    cli.run(main)
