"""Fine-tuning for classification: pooling, sharding, learning, exact resume and refused input."""
import csv
import json
import os
import pathlib
import shutil
import sysconfig

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cgpt_jax.config import base_config, resolve
from cgpt_jax.data.tokenizer import load_tokenizer
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.model import SequenceClassifier
from cgpt_jax.finetune.objective import ClassificationObjective
from cgpt_jax.finetune.train import finetune
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train.setup import build_run


def tiny_model_cfg(vocab_size: int = 257) -> ml_collections.ConfigDict:
    m = base_config().model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = vocab_size, 32, 2, 2, 128, 64
    m.scan_layers = False
    return m


def test_pooling_reads_each_rows_last_real_token():
    model = SequenceClassifier(tiny_model_cfg(), 5, rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(0)
    lengths = [3, 9, 1, 6]
    rows = [rng.integers(0, 256, n) for n in lengths]
    padded = np.full((4, 9), 256, np.int32)  # the pad id is EOS here; pooling never looks at it
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    batched = model(jnp.asarray(padded), jnp.asarray(lengths))
    for i, row in enumerate(rows):
        alone = model(jnp.asarray(row[None], jnp.int32), jnp.asarray([len(row)]))
        np.testing.assert_allclose(batched[i], alone[0], rtol=1e-5, atol=1e-6)
    moved = model(jnp.asarray(padded), jnp.asarray([2, 9, 1, 6]))  # another length pools another token
    assert not np.allclose(moved[0], batched[0])


def _config(ft_init: str, task: str, **train) -> ml_collections.ConfigDict:
    config = base_config()
    config.finetune.task, config.finetune.init = task, ft_init
    t = config.train
    t.seq_len, t.global_batch_size, t.steps, t.peak_lr, t.warmup_steps = 32, 16, 60, 3e-3, 3
    t.final_lr_fraction, t.weight_decay, t.log_every, t.eval_every = 0.0, 0.01, 10, 30
    config.checkpoint.every_steps = 30
    for k, v in train.items():
        t[k] = v
    return config


def test_sharded_loss_and_gradients_equal_unsharded():
    config = _config("unused", "stdlib_topics")
    config.model = tiny_model_cfg()
    config.model.vocab_pad_multiple = 2  # 'vocab' is split over tensor=2
    config = resolve(config)
    objective = ClassificationObjective(4, "softmax")
    rng = np.random.default_rng(1)
    batch = {"inputs": rng.integers(0, 257, (16, 32)).astype(np.int32),
             "lengths": rng.integers(1, 33, 16).astype(np.int32), "labels": rng.integers(0, 4, 16).astype(np.int32)}
    results = []
    for mesh_fields, devices in (({"data": 1}, jax.devices()[:1]), ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())):
        c = ml_collections.ConfigDict(config.to_dict())
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_fields.get("data"), mesh_fields.get("fsdp", 1), mesh_fields.get("tensor", 1)
        c.mesh.max_replicated_fraction = 1.0
        run = build_run(c, make_mesh(c.mesh, devices), objective=objective)
        state = run.init_state()
        placed = {k: jax.device_put(v, run.batch_shardings[k]) for k, v in batch.items()}
        loss = float(run.eval_step(state.params, placed))
        state, metrics = run.train_step(state, placed)
        results.append((loss, float(metrics["grad_norm"])))
    np.testing.assert_allclose(results[0], results[1], rtol=2e-5)


# --- end to end on a small real task ------------------------------------------------------------------

def _bytes_backbone(tmp_path: pathlib.Path, num_labels: int = -1, vocab_size: int = 257) -> str:
    """A run directory as far as fine-tuning from scratch reads it: config.json and its store's tokenizer."""
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    load_tokenizer("bytes").save(store / "tokenizer.json")
    run_dir = tmp_path / f"backbone{num_labels}_{vocab_size}"
    run_dir.mkdir()
    config = base_config()
    config.model = tiny_model_cfg(vocab_size)
    config.data.tokenizer = "bytes"
    raw = {**config.to_dict(), "data_description": {"store": str(store)}}
    raw["finetune"]["num_labels"] = num_labels
    (run_dir / "config.json").write_text(json.dumps(raw))
    return str(run_dir)


def _def_or_class_csv(path: pathlib.Path) -> str:
    """Real text: the `def` and `class` lines of the standard library's email package, labelled by keyword,
    with the keyword cut off (what is left: names, arguments and bases)."""
    rows = []
    for file in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "email").glob("*.py")):
        for line in file.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            for keyword in ("def ", "class "):
                if stripped.startswith(keyword) and stripped.endswith(":"):
                    rows.append((stripped[len(keyword):], keyword.strip()))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return f"csv:{path}"


def test_loss_falls_accuracy_beats_majority_and_resume_is_exact(tmp_path):
    task = _def_or_class_csv(tmp_path / "email.csv")
    config = _config(_bytes_backbone(tmp_path), task)
    config.finetune.from_scratch = True
    workdir = str(tmp_path / "run")
    summary = finetune(config, workdir, show_progress=False)
    losses = [r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r]
    assert np.mean(losses[-2:]) < 0.7 * losses[0]
    assert summary["test"]["accuracy"] > summary["majority_baseline_test"]["accuracy"] + 0.03
    assert set(summary["test"]) == {"accuracy", "macro_f1", "loss", "examples"}
    assert os.path.isfile(os.path.join(workdir, "confusion_test.png"))

    # Resume: drop the last checkpoint and the summary; the re-run continues from step 30 bit for bit.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "60"))
    os.remove(os.path.join(resumed, "summary.json"))
    again = finetune(config, resumed, show_progress=False)
    assert again["test"] == summary["test"]
    assert again["final_train_loss"] == summary["final_train_loss"]


# --- refused input: a clear error before anything is written -----------------------------------------

def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("content, task_kind, message", [
    ("words,label\nhello,a\n", "csv", "no column 'text'"),
    ("text,label\nhello,a\n,b\n", "csv", ":3: the 'text' field is empty"),
    ('{"text": "x", "label": "a"}\n{"text": "y"}\n', "jsonl", ":2: no field 'label'"),
])
def test_bad_files_name_file_and_line(tmp_path, content, task_kind, message):
    data = _write(tmp_path / f"data.{task_kind}", content)
    workdir = tmp_path / "run"
    config = _config(_bytes_backbone(tmp_path), f"{task_kind}:{data}")
    with pytest.raises(InputError, match=message) as info:
        finetune(config, str(workdir), show_progress=False)
    assert str(data) in str(info.value)
    assert not workdir.exists()


def test_unknown_label_and_missing_split_file(tmp_path):
    for split, label in (("train", "a"), ("validation", "b"), ("test", "zzz")):
        _write(tmp_path / f"{split}.csv", f"text,label\nsome text,{label}\nmore text,{'b' if split == 'train' else label}\n")
    config = _config(_bytes_backbone(tmp_path), f"csv:{tmp_path}")
    with pytest.raises(InputError, match=r"test.csv:2: label 'zzz' is not one of the labels \['a', 'b'\]"):
        finetune(config, str(tmp_path / "run"), show_progress=False)
    os.remove(tmp_path / "validation.csv")
    with pytest.raises(InputError, match="validation.csv is not there"):
        finetune(config, str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_backbone_mismatches_are_refused(tmp_path):
    task = _def_or_class_csv(tmp_path / "email.csv")
    with pytest.raises(InputError, match="is a classifier of 3 labels but the task has 2"):
        finetune(_config(_bytes_backbone(tmp_path, num_labels=3), task), str(tmp_path / "run"), show_progress=False)
    with pytest.raises(InputError, match="its tokenizer has 257 tokens but the model's vocabulary is 200"):
        finetune(_config(_bytes_backbone(tmp_path, vocab_size=200), task), str(tmp_path / "run"), show_progress=False)
    with pytest.raises(InputError, match="is not there"):
        finetune(_config(str(tmp_path / "nowhere"), task), str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists()
