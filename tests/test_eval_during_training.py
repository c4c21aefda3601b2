"""Zero-shot tasks scored during pretraining (config.eval.tasks): logged at every evaluation, equal to
scoring the saved checkpoint with lm-eval and `python -m cgpt_jax.evaluate`'s model; bad task lists
refused first."""
from __future__ import annotations

import json
import pathlib
import shutil
import sysconfig

import jax
import pytest

from cgpt_jax.config import validate
from cgpt_jax.errors import InputError
from cgpt_jax.eval import tasks
from cgpt_jax.eval.during_training import TASK_KINDS
from cgpt_jax.run_dir import METRICS
from cgpt_jax.train.loop import train_and_evaluate

from tests.helpers import tiny_config

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
TASK = "cgpt_stdlib_nextline"
LIMIT, BATCH = 6, 8


def text_run_config(tmp_path: pathlib.Path):
    """A d32 1-layer model on a few standard-library files with the byte tokenizer (nothing to train)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "csv.py", "shlex.py"):  # shlex.py: the validation split at 0.3
        shutil.copy(STDLIB / name, corpus / name.replace("/", "_"))
    c = tiny_config()
    c.model.vocab_size, c.model.max_seq_len, c.model.n_layers = -1, 128, 1
    c.train.seq_len, c.train.global_batch_size, c.train.steps, c.train.eval_every = 64, 8, 3, 2
    c.data.source, c.data.text_dir, c.data.tokenizer = "text_dir", str(corpus), "bytes"
    c.data.cache_dir, c.data.eval_batches, c.data.val_fraction = str(tmp_path / "cache"), 1, 0.3
    c.eval.tasks, c.eval.limit, c.eval.batch_size = TASK, LIMIT, BATCH
    return c


def test_tasks_logged_at_each_evaluation_equal_evaluate_on_the_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="needs the [eval] extra (pip install 'cgpt_jax[eval]')")
    workdir = tmp_path / "run"
    train_and_evaluate(text_run_config(tmp_path), str(workdir), devices=jax.devices()[:1], show_progress=False)
    rows = [json.loads(line) for line in (workdir / METRICS).read_text().splitlines()]
    logged = [row for row in rows if f"eval/{TASK}/acc" in row]
    assert [row["step"] for row in logged] == [1, 2]  # every train.eval_every=2 steps and the last
    assert all(0 <= row[f"eval/{TASK}/{m}"] <= 1 for row in logged for m in ("acc", "acc_norm"))

    # The saved checkpoint through lm-eval with `python -m cgpt_jax.evaluate`'s model (lm-eval's CLI would
    # also index its thousands of own tasks: minutes on a loaded machine).
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(name, value)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cgpt_jax.eval.harness import CgptJaxLM

    task_dir = tmp_path / "tasks"
    tasks.write_tasks(task_dir)  # what `evaluate tasks DIR` writes: the run scored the first LIMIT of these
    results = lm_eval.simple_evaluate(model=CgptJaxLM(checkpoint=str(workdir), batch_size=BATCH), tasks=[TASK],
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                      limit=LIMIT)["results"][TASK]
    assert logged[-1][f"eval/{TASK}/acc"] == results["acc,none"]
    assert logged[-1][f"eval/{TASK}/acc_norm"] == results["acc_norm,none"]


def test_every_offline_task_has_a_scorer():
    assert set(TASK_KINDS) == set(tasks.TASKS)


def test_bad_task_lists_are_refused_before_anything_runs(tmp_path):
    config = text_run_config(tmp_path)
    config.eval.tasks = f"{TASK},hellaswag"
    with pytest.raises(InputError, match=r"unknown offline tasks \['hellaswag'\]; the available: cgpt_stdlib_bpb"):
        train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], show_progress=False)
    assert not (tmp_path / "run").exists()
    synthetic = tiny_config()
    synthetic.eval.tasks = TASK
    with pytest.raises(InputError, match="needs a tokenizer but data.source='synthetic'"):
        validate(synthetic, 1)
