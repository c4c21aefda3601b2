"""python -m cgpt_jax.classify: a fine-tuning run's best (else last) checkpoint, predictions equal to the
model on full-length rows, one compile per length bucket, JSONL/CSV out, refused input."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cgpt_jax import classify, generate, quantize
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.data import bucket_length, length_batches, tokenize
from cgpt_jax.finetune.model import SequenceClassifier
from cgpt_jax.finetune.predict import load_classifier
from cgpt_jax.finetune.predict import probabilities as probabilities_of
from cgpt_jax.finetune.train import finetune
from cgpt_jax.interop import hf
from tests.test_finetune import _bytes_backbone, _config, _def_or_class_csv
from tests.helpers import one_device_env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("classify")
    config = _config(_bytes_backbone(tmp), _def_or_class_csv(tmp / "email.csv"), steps=4, eval_every=2)
    config.finetune.from_scratch = True
    config.checkpoint.every_steps = 2
    workdir = str(tmp / "run")
    finetune(config, workdir, show_progress=False)
    return workdir


def test_length_buckets():
    assert [bucket_length(n, 32) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    batches = length_batches(np.array([3, 20, 9, 5, 30, 12]), batch_size=2, max_len=32)
    assert [(rows.tolist(), length) for rows, length in batches] == [([0, 3], 8), ([2, 5], 16), ([1, 4], 32)]


def test_bucketed_predictions_equal_full_length_rows_one_compile_per_bucket(run_dir, monkeypatch):
    traces = []
    call = SequenceClassifier.__call__
    monkeypatch.setattr(SequenceClassifier, "__call__",
                        lambda self, tokens, lengths: (traces.append(tokens.shape), call(self, tokens, lengths))[1])
    classifier = load_classifier(run_dir)
    assert classifier.source.startswith(os.path.join(run_dir, "best", "checkpoints"))
    assert classifier.label_names == ["class", "def"]
    texts = ["Message(object)", "get_payload(self, i=None)", "x", "Parser:",
             "walk(self)" * 8, "a" * 100]  # 15, 25, 1, 7, 80, 100 bytes: buckets 16, 32, 8, 8, 32, 32 (cut)
    probabilities, truncated = classifier.predict(texts, batch_size=2)
    assert truncated == 2
    assert sorted(traces) == [(2, 8), (2, 16), (2, 32)]
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
    # Bucketed batches = every row padded to max_len in one batch (which equals each row unpadded:
    # tests/test_finetune.py's pooling test).
    tokens_NxL, lengths_N, _ = tokenize(texts, classifier.tokenizer, classifier.max_len)
    logits_NxC = np.asarray(classifier.forward(tokens_NxL, lengths_N))
    np.testing.assert_allclose(probabilities, probabilities_of(logits_NxC, "softmax"), rtol=1e-5, atol=1e-7)

    shutil.move(os.path.join(run_dir, "best"), os.path.join(run_dir, "best.moved"))
    try:
        assert load_classifier(run_dir).source == os.path.join(run_dir, "checkpoints", "4")  # no best: the last
    finally:
        shutil.move(os.path.join(run_dir, "best.moved"), os.path.join(run_dir, "best"))


def test_inputs_and_records(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"body": "one"}\n\n{"body": "two"}\n')
    assert classify.read_inputs(None, str(data), "body") == ["one", "two"]
    plain = tmp_path / "in.txt"
    plain.write_text("first\n\nsecond\n")
    assert classify.read_inputs(None, str(plain), "text") == ["first", "second"]
    with pytest.raises(InputError, match="in.jsonl:1: no field 'text'; name it with --text_field"):
        classify.read_inputs(None, str(data), "text")
    with pytest.raises(InputError, match="--text number 2 is empty"):
        classify.read_inputs(["ok", " "], None, "text")
    rows = classify.records(["a", "b"], np.array([[0.25, 0.75], [0.5, 0.5]]), ["neg", "pos"])
    assert rows[0] == {"text": "a", "label": "pos", "probabilities": {"neg": 0.25, "pos": 0.75}}
    out = io.StringIO()
    classify.write_records(rows, ["neg", "pos"], out, ".csv")
    assert list(csv.reader(io.StringIO(out.getvalue()))) == [
        ["text", "label", "prob_neg", "prob_pos"], ["a", "pos", "0.25", "0.75"], ["b", "neg", "0.5", "0.5"]]


def _command(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cgpt_jax.classify", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=one_device_env())


def test_command_reads_stdin_writes_csv_and_refuses_a_language_model(run_dir, tmp_path):
    out = tmp_path / "predictions.csv"
    done = _command(f"--checkpoint={run_dir}", f"--output={out}", stdin="Message(object)\n\nwalk(self)\n")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(out)))
    assert [r["text"] for r in rows] == ["Message(object)", "walk(self)"]
    expected, _ = load_classifier(run_dir).predict(["Message(object)", "walk(self)"], batch_size=32)
    np.testing.assert_allclose([[float(r["prob_class"]), float(r["prob_def"])] for r in rows], expected, rtol=1e-6)

    backbone = json.load(open(os.path.join(run_dir, "config.json")))["data_description"]["backbone"]
    refused = _command(f"--checkpoint={backbone}", "--text=walk(self)")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: --checkpoint={backbone}: {backbone}/config.json is not a fine-tuning run's (no finetune.num_labels "
        f"or label names) — a language model generates text: python -m cgpt_jax.generate --checkpoint={backbone}"]


def test_an_exported_run_predicts_the_same_in_transformers_and_from_its_hf_directory(run_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    classifier = load_classifier(run_dir)
    out = tmp_path / "hf"
    eos = classifier.tokenizer.eos_id  # our padding; a text never holds it, so transformers pools where we do
    hf.save_classifier(classifier.model, out, label_names=classifier.label_names, loss=classifier.loss,
                       pad_token_id=eos, tokenizer=classifier.tokenizer.hf, eos_token_id=eos)
    texts = ["Message(object)", "walk(self)", "Parser(feed)", "as_string(self)"]  # one bucket (16), none cut
    ours, _ = classifier.predict(texts, batch_size=4)
    tokens_NxL, _, _ = tokenize(texts, classifier.tokenizer, classifier.max_len)
    reference = transformers.GPT2ForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens_NxL, dtype=torch.long)).logits.softmax(-1).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    imported = load_classifier(str(out))
    assert imported.label_names == classifier.label_names and imported.source == str(out)
    np.testing.assert_allclose(imported.predict(texts, batch_size=4)[0], ours, atol=1e-6)


def test_a_quantized_classifier_checkpoint_predicts_as_quantizing_on_the_fly(run_dir, tmp_path):
    out = tmp_path / "int8"
    done = subprocess.run([sys.executable, "-m", "cgpt_jax.quantize", f"--checkpoint={run_dir}", "--scheme=int8",
                           f"--output={out}"], capture_output=True, text=True, timeout=300, env=one_device_env())
    assert done.returncode == 0, done.stderr
    written = json.loads(done.stdout)
    assert written["quantized_bytes"]["total"] < written["float_bytes"] / 2

    texts = ["Message(object)", "walk(self)", "x"]
    saved = load_classifier(str(out))
    on_the_fly = load_classifier(run_dir, quantize.parse("int8"))
    score = saved.model.score.get_value()
    assert isinstance(score, quantize.QuantizedArray) and score.bits == 8  # restored as integers
    assert (saved.label_names, saved.loss, saved.max_len) == (on_the_fly.label_names, on_the_fly.loss,
                                                              on_the_fly.max_len)
    assert saved.tokenizer.sha256 == on_the_fly.tokenizer.sha256
    np.testing.assert_array_equal(saved.predict(texts, batch_size=2)[0], on_the_fly.predict(texts, batch_size=2)[0])

    with pytest.raises(InputError, match="holds a model quantized with int8; int4 was asked for"):
        load_classifier(str(out), quantize.parse("int4"))
    with pytest.raises(ValueError, match=f"--checkpoint={out} is a quantized classifier of 2 labels, not a language "
                                         f"model — classify texts with python -m cgpt_jax.classify"):
        generate.load(str(out))
