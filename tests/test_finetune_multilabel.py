"""Fine-tuning: length-bucketed training batches (bounded shapes, deterministic, every row once per epoch)
and multi-label data (lists of labels, sigmoid loss, multi-label metrics against scikit-learn, refused
mixed input)."""
import csv
import io
import json
import pathlib
import sysconfig

import numpy as np
import pytest

from cgpt_jax import classify
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.data import ClassificationData, Encoded, bucket_length, read_task
from cgpt_jax.finetune.metrics import majority_baseline, multilabel_metrics
from cgpt_jax.finetune.objective import classification_loss
from cgpt_jax.finetune.predict import load_classifier
from cgpt_jax.finetune.train import finetune

from tests.test_finetune import _bytes_backbone, _config


# --- length-bucketed training batches ----------------------------------------------------------------

def _data(length_buckets: bool, n: int = 203, batch: int = 8, max_len: int = 100) -> ClassificationData:
    lengths_N = np.random.default_rng(1).integers(1, max_len + 1, n).astype(np.int32)
    tokens_NxL = np.zeros((n, max_len), np.int32)
    train = Encoded(tokens_NxL, lengths_N, np.zeros(n, np.int32), truncated=0)
    return ClassificationData(train, global_batch_size=batch, seed=3, shardings={}, vocab_size=257,
                              description={}, length_buckets=length_buckets)


def test_bucketed_batches_cover_each_row_once_per_epoch_in_few_shapes():
    data = _data(length_buckets=True)
    n, b, max_len = 203, 8, 100
    allowed = {bucket_length(k, max_len) for k in range(1, max_len + 1)}
    assert allowed == {8, 16, 32, 64, 100}
    for epoch in range(3):
        batches = data.epoch_batches(epoch)
        assert len(batches) == n // b
        rows = np.concatenate([r for r, _ in batches])
        assert len(rows) == len(set(rows.tolist())) == n // b * b
        for r, length in batches:
            assert len(r) == b and length in allowed and data.train.lengths_N[r].max() <= length
    # Bucketing pads far less than max_len, and the order is a pure function of (seed, epoch).
    padded = sum(length for _, length in data.epoch_batches(0)) * b
    assert padded < 0.75 * (n // b) * b * max_len
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1]
               for x, y in zip(data.epoch_batches(1), _data(length_buckets=True).epoch_batches(1)))
    assert data.epoch_batches(0)[0][0].tolist() != data.epoch_batches(1)[0][0].tolist()
    step = 2 * (n // b) + 5
    rows, length = data.batch_rows(step)
    assert np.array_equal(rows, data.epoch_batches(2)[5][0]) and length == data.epoch_batches(2)[5][1]


def test_unbucketed_batches_are_slices_of_the_epoch_permutation():
    data = _data(length_buckets=False)
    order = np.random.default_rng([3, 1]).permutation(203)
    assert [(r.tolist(), length) for r, length in data.epoch_batches(1)[:2]] == \
        [(order[:8].tolist(), 100), (order[8:16].tolist(), 100)]


# --- multi-label ------------------------------------------------------------------------------------------

def test_multilabel_metrics_equal_scikit_learn():
    metrics_ = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference")
    rng = np.random.default_rng(0)
    true_NxC = (rng.random((50, 4)) < 0.4).astype(np.int32)
    predicted_NxC = np.where(rng.random((50, 4)) < 0.7, true_NxC, 1 - true_NxC)
    predicted_NxC[:, 3] = 0  # a class never predicted: its precision and F1 count 0
    m = multilabel_metrics(true_NxC, predicted_NxC, ["a", "b", "c", "d"])
    assert m["micro_f1"] == pytest.approx(metrics_.f1_score(true_NxC, predicted_NxC, average="micro"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(
        metrics_.f1_score(true_NxC, predicted_NxC, average="macro", zero_division=0), abs=1e-12)
    assert m["exact_match"] == m["accuracy"] == metrics_.accuracy_score(true_NxC, predicted_NxC)
    assert m["hamming_accuracy"] == pytest.approx(1 - metrics_.hamming_loss(true_NxC, predicted_NxC), abs=1e-12)
    precision = metrics_.precision_score(true_NxC, predicted_NxC, average=None, zero_division=0)
    assert [m["per_class"][c]["precision"] for c in "abcd"] == pytest.approx(precision, abs=1e-12)
    assert np.diag(m["confusion"]).tolist() == ((true_NxC == 1) & (predicted_NxC == 1)).sum(0).tolist()
    baseline = majority_baseline(np.array([[1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]]), true_NxC, list("abcd"))
    assert baseline["exact_match"] == np.mean((true_NxC == [1, 0, 1, 0]).all(1))


def test_multilabel_loss_is_the_mean_binary_cross_entropy():
    logits_BxC = np.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]], np.float32)
    labels_BxC = np.array([[1, 0, 1], [0, 0, 0]], np.int32)
    p = 1 / (1 + np.exp(-logits_BxC.astype(np.float64)))
    expected_B = -(labels_BxC * np.log(p) + (1 - labels_BxC) * np.log(1 - p)).mean(-1)
    np.testing.assert_allclose(classification_loss(logits_BxC, labels_BxC, "sigmoid"), expected_B, rtol=1e-6)


def _multilabel_jsonl(path: pathlib.Path) -> str:
    """Real text: the `def` and `class` lines of the standard library's email package, keyword cut off,
    each with the labels it has among 'class' (a class line), 'private' (its name starts with '_') and
    'method' (it takes self); many have none or two."""
    with open(path, "w") as f:
        for file in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "email").glob("*.py")):
            for line in file.read_text(encoding="utf-8").splitlines():
                stripped = line.strip()
                for keyword in ("def ", "class "):
                    if stripped.startswith(keyword) and stripped.endswith(":"):
                        text = stripped[len(keyword):]
                        labels = [name for name, has in (("class", keyword == "class "),
                                                         ("private", text.startswith("_")),
                                                         ("method", "(self" in text)) if has]
                        f.write(json.dumps({"text": text, "label": labels}) + "\n")
    return f"jsonl:{path}"


def test_multilabel_fine_tuning_learns_and_reports_multilabel_metrics(tmp_path):
    config = _config(_bytes_backbone(tmp_path), _multilabel_jsonl(tmp_path / "email.jsonl"), eval_every=60)
    config.finetune.from_scratch, config.finetune.loss = True, "sigmoid"
    config.finetune.length_buckets = False  # one train-step shape: fewer compiles (buckets: the tests above)
    config.checkpoint.every_steps = 60  # one save
    workdir = tmp_path / "run"
    summary = finetune(config, str(workdir), show_progress=False)
    losses = [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert np.mean(losses[-2:]) < 0.6 * losses[0]
    test = summary["test"]
    assert {"exact_match", "micro_f1", "macro_f1", "hamming_accuracy", "loss"} <= set(test)
    assert test["micro_f1"] > 0.8 and test["exact_match"] > summary["majority_baseline_test"]["accuracy"] + 0.2
    description = json.loads((workdir / "config.json").read_text())["data_description"]
    assert description["multi_label"] and description["label_names"] == ["class", "method", "private"]

    # classify gives each test text its label set (every label with probability >= 0.5), the sets the run's
    # own test metrics were computed from.
    classifier = load_classifier(str(workdir))
    task = read_task(config.finetune)
    rows = classify.classify(classifier, [e.text for e in task.splits["test"]], batch_size=16)
    for row in rows:
        p = row["probabilities"]
        assert row["labels"] == sorted([n for n in p if p[n] >= 0.5], key=lambda n: -p[n]) and "label" not in row
    predicted_NxC = np.array([[name in row["labels"] for name in task.label_names] for row in rows])
    again = multilabel_metrics(task.label_ids("test"), predicted_NxC, task.label_names)
    assert again["micro_f1"] == pytest.approx(test["micro_f1"], abs=1e-12)
    assert again["exact_match"] == pytest.approx(test["exact_match"], abs=1e-12)
    out = io.StringIO()
    classify.write_records(rows, classifier.label_names, out, ".csv")
    header, first, *_ = list(csv.reader(io.StringIO(out.getvalue())))
    assert header[:2] == ["text", "labels"] and first[1] == "|".join(rows[0]["labels"])


def test_mixed_or_softmax_multilabel_input_is_refused(tmp_path):
    backbone = _bytes_backbone(tmp_path)
    mixed, listed = tmp_path / "mixed", tmp_path / "listed"
    for directory, kind, train in ((mixed, "jsonl", '{"text": "a b", "label": ["x", "y"]}\n{"text": "c", "label": "x"}\n'),
                                   (listed, "csv", "text,label\na b,x|y\nc,x\n")):
        directory.mkdir()
        (directory / f"train.{kind}").write_text(train)
        for split in ("validation", "test"):
            (directory / f"{split}.{kind}").write_text(train)
    config = _config(backbone, f"jsonl:{mixed}")
    config.finetune.loss = "sigmoid"
    with pytest.raises(InputError, match=r"train.jsonl:2: the label 'x' is a single label but .*train.jsonl:1 has "
                                         r"a list \['x', 'y'\]; write every label of a multi-label task as a list"):
        finetune(config, str(tmp_path / "run"), show_progress=False)
    config = _config(backbone, f"csv:{listed}")
    with pytest.raises(InputError, match="is multi-label .* but finetune.loss='softmax'; train it with "
                                         "--config.finetune.loss=sigmoid"):
        finetune(config, str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists()
