"""The fine-tuning comparison sweep: the sweep launches the trainer its experiment file names, and `analyze`
recognises a sweep of classification runs and writes the methods' table and plot (a synthetic two-run sweep of
a tiny model: its summaries are written here, its parameters counted and its step costs measured for real)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cgpt_jax.config import base_config, resolve
from cgpt_jax.finetune import compare
from cgpt_jax.run_dir import CONFIG, FINISHED, SUMMARY
from cgpt_jax.scaling import runner
from cgpt_jax.scaling.experiment import load_experiment, train_command

REPO = Path(__file__).resolve().parents[1]
FAKE_TRAINER = '''import json, pathlib, sys
workdir = pathlib.Path(next(a for a in sys.argv if a.startswith("--workdir=")).split("=", 1)[1])
workdir.mkdir(parents=True, exist_ok=True)
(workdir / "summary.json").write_text(json.dumps({"status": "finished", "trainer": __spec__.name,
                                                  "argv": sys.argv[1:]}))
'''


def test_the_sweep_launches_the_trainer_its_experiment_names(tmp_path, monkeypatch):
    (tmp_path / "peft_fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    experiment_file = tmp_path / "exp.py"
    experiment_file.write_text("import ml_collections\nTRAINER = 'peft_fake_trainer'\n"
                               "def get_config(arg=None):\n"
                               "    return ml_collections.ConfigDict({'train': {'steps': 1}})\n"
                               "def sweep(arg=None):\n"
                               "    return [{'name': 'a', 'train.steps': 2}]\n")
    experiment = load_experiment(str(experiment_file))
    assert runner.run_local(experiment, experiment.runs(), tmp_path / "sweep", progress=False) == {"a": "finished"}
    summary = json.loads((tmp_path / "sweep" / "a" / SUMMARY).read_text())
    assert summary["trainer"] == "peft_fake_trainer"
    assert summary["argv"] == [f"--config={experiment_file}", "--config.train.steps=2",
                               f"--workdir={tmp_path / 'sweep' / 'a'}"]

    compare_sweep = load_experiment(str(REPO / "experiments/peft_compare.py") + ":init=runs/x")
    commands = [train_command(compare_sweep, run, "w") for run in compare_sweep.runs()]
    assert {tuple(c[:3]) for c in commands} == {(sys.executable, "-m", "cgpt_jax.finetune")}
    assert {"prompt", "prefix", "full"} <= {run.name for run in compare_sweep.runs()}
    ladder = load_experiment(str(REPO / "experiments/cpu_ladder.py"))
    assert train_command(ladder, ladder.runs()[0], "w")[:3] == [sys.executable, "-m", "cgpt_jax.train"]

    experiment_file.write_text(experiment_file.read_text().replace("'peft_fake_trainer'", "'no_such_trainer'"))
    with pytest.raises(ValueError, match="TRAINER='no_such_trainer' is not an importable module"):
        load_experiment(str(experiment_file))


def tiny_classifier_config(method: str) -> dict:
    c = base_config()
    m, t = c.model, c.train
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 64, 32, 1, 4, 64, 16
    m.scan_layers = False  # one layer: the least to compile
    t.seq_len, t.global_batch_size = 16, 4
    c.finetune.method, c.finetune.num_labels = method, 3
    return json.loads(resolve(c).to_json_best_effort())


def test_analyze_writes_the_methods_table_and_plot(tmp_path):
    results = {"full": ("full", 0.61, 0.52, 40.0), "lora": ("lora(rank=2, alpha=4, targets='qkv')", 0.55, 0.47, 30.0)}
    for name, (method, accuracy, macro_f1, wall) in results.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG).write_text(json.dumps(tiny_classifier_config(method)))
        (tmp_path / name / SUMMARY).write_text(json.dumps(
            {"status": FINISHED, "wall_time_s": wall, "test": {"accuracy": accuracy, "macro_f1": macro_f1}}))
    assert compare.is_comparison(tmp_path) and not compare.is_comparison(tmp_path / "missing")

    compare.write_outputs(tmp_path, tmp_path, rounds=2, steps_per_round=1)  # what analyze DIR runs for it
    table = json.loads((tmp_path / compare.TABLE).read_text())
    rows = {r["name"]: r for r in table["rows"]}
    # The model: embeddings, one block (2 LayerNorms, qkv, out, up, down with biases), ln_f, a 32x3 head.
    block = 2 * 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32)
    base = 64 * 32 + 16 * 32 + block + 2 * 32 + 32 * 3
    lora = 32 * 2 + 2 * 96  # A [32, 2] and B [2, 96]
    assert (rows["full"]["params"], rows["full"]["trainable"]) == (base, base)
    assert (rows["lora"]["params"], rows["lora"]["trainable"]) == (base + lora, lora + 32 * 3)
    assert rows["full"]["step_time_rel"] == 1.0 and rows["full"]["peak_memory_rel"] == 1.0
    assert rows["lora"]["step_time_rel"] > 0 and rows["lora"]["seconds_per_step"] > 0
    assert rows["lora"]["peak_memory_rel"] < 1.0  # Adam's moments of 352 parameters instead of 11k
    report = (tmp_path / compare.REPORT).read_text()
    assert f"| lora | `{results['lora'][0]}` | 352 | {100 * 352 / (base + lora):.2f}% | 0.550 | 0.470 |" in report
    assert (tmp_path / compare.PLOT).read_bytes()[:4] == b"\x89PNG"
