"""Sweep expansion, the local runner (skip / resume / failure) and the cluster script writers.

The runner is driven with tests/scaling_fixtures/fake_train.py, which parses the same flags as the real
trainer with absl config_flags but trains nothing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from cgpt_jax.scaling import runner
from cgpt_jax.scaling.experiment import RunSpec, apply_overrides, load_experiment, parse_spec, train_command

FIXTURES = Path(__file__).parent / "scaling_fixtures"
FAKE = FIXTURES / "fake_experiment.py"
FAKE_TRAIN = (sys.executable, str(FIXTURES / "fake_train.py"))
REPO = Path(__file__).resolve().parents[1]


def _write_experiment(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "exp.py"
    path.write_text("import ml_collections\n\n"
                    "def get_config(arg=None):\n"
                    "    return ml_collections.ConfigDict({'model': {'d_model': 8}, 'train': {'lr': 0.1}, "
                    "'mesh': {'rules': [['batch', 'data']]}})\n\n"
                    + body)
    return path


def test_parse_spec():
    assert parse_spec("experiments/x.py") == (Path("experiments/x.py"), None)
    assert parse_spec("experiments/x.py:size=111m,mup=True") == (Path("experiments/x.py"), "size=111m,mup=True")
    assert parse_spec("x.py:data=a:b") == (Path("x.py"), "data=a:b")
    with pytest.raises(ValueError, match="expected an experiment file"):
        parse_spec("experiments/x")


def test_expansion_and_overrides():
    experiment = load_experiment(f"{FAKE}:lr=0.01")
    assert experiment.spec == f"{FAKE}:lr=0.01"
    runs = experiment.runs()
    assert [r.name for r in runs] == ["d8", "d16", "crash", "flaky"]
    config = apply_overrides(experiment.base_config(), runs[1])
    assert (config.model.d_model, config.model.n_layers, config.fake.shape) == (16, 2, (3, 4))
    assert config.train.peak_lr == 0.01
    assert experiment.base_config().model.d_model == 8  # the base is not modified
    assert len(load_experiment(f"{FAKE}:good=1").runs()) == 2
    assert experiment.config_record(runs[0])["train"]["peak_lr"] == 0.01


def test_config_arg_selects_the_base_config_of_a_run(tmp_path):
    path = tmp_path / "sizes.py"
    path.write_text("import ml_collections\n\n"
                    "def get_config(arg=None):\n"
                    "    return ml_collections.ConfigDict({'model': {'d_model': 16 if arg == 'size=big' else 8}})\n\n"
                    "def sweep(arg=None):\n"
                    "    return [{'name': 'small', 'config_arg': 'size=small'}, {'name': 'big', 'config_arg': 'size=big'},\n"
                    "            {'name': 'own'}]\n")
    experiment = load_experiment(f"{path}:size=x")
    small, big, own = experiment.runs()
    assert (small.config_arg, small.overrides) == ("size=small", {})
    assert experiment.run_config(big).model.d_model == 16
    assert train_command(experiment, big, "w", ("t",))[1] == f"--config={path}:size=big"
    assert train_command(experiment, own, "w", ("t",))[1] == f"--config={path}:size=x"


def test_override_flags_round_trip_through_config_flags():
    """What the subprocess parses equals what the runner validated."""
    experiment = load_experiment(str(FAKE))
    run = experiment.runs()[1]
    argv = train_command(experiment, run, "/tmp/unused", ("prog",))
    assert argv[1] == f"--config={FAKE}"
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)  # overrides are read from argv
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(argv)
    assert values.config.to_dict() == apply_overrides(experiment.base_config(), run).to_dict()
    assert values.config.fake.label == "a b=c" and values.config.fake.verbose is True


@pytest.mark.parametrize("body, error, match", [
    ("def sweep(arg=None):\n    return [{'name': 'a'}, {'name': 'a'}]\n", ValueError, "appears twice"),
    ("def sweep(arg=None):\n    return [{'name': 'a', 'model.dmodel': 4}]\n", ValueError, "no field 'dmodel'"),
    ("def sweep(arg=None):\n    return [{'name': 'a', 'model.d_model': 'big'}]\n", TypeError, "cannot set"),
    ("def sweep(arg=None):\n    return [{'name': 'a/b'}]\n", ValueError, "must match"),
    ("def sweep(arg=None):\n    return [{'model.d_model': 4}]\n", ValueError, "'name' key"),
    ("def sweep(arg=None):\n    return []\n", ValueError, "non-empty list"),
    ("def sweep(arg=None):\n    return [{'name': 'a', 'mesh.rules': [['x', 'y']]}]\n", TypeError, "carries only"),
    ("", TypeError, "defines no sweep"),
])
def test_bad_sweeps(tmp_path, body, error, match):
    with pytest.raises(error, match=match):
        load_experiment(str(_write_experiment(tmp_path, body))).runs()


def test_missing_experiment_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_experiment(str(tmp_path / "nope.py"))


def test_local_runner_skip_resume_and_failure(tmp_path):
    experiment = load_experiment(str(FAKE))
    runs = experiment.runs()
    statuses = runner.run_local(experiment, runs, tmp_path, train_argv=FAKE_TRAIN, progress=False)
    assert statuses == {"d8": "finished", "d16": "finished", "crash": "failed", "flaky": "failed"}
    failure = json.loads((tmp_path / "crash" / runner.FAILURE).read_text())
    assert failure["returncode"] == 3 and "boom" in failure["stderr_tail"]
    assert json.loads((tmp_path / "flaky" / runner.FAILURE).read_text())["returncode"] == 137
    table = json.loads((tmp_path / runner.SWEEP_TABLE).read_text())
    assert {k: v["status"] for k, v in table["runs"].items()} == statuses
    summary = json.loads((tmp_path / "d16" / "summary.json").read_text())
    assert summary["fake_config"] == {"outcome": "finish", "shape": [3, 4], "verbose": True, "label": "a b=c"}

    # --skip_failed leaves failed runs alone.
    statuses = runner.run_local(experiment, runs, tmp_path, train_argv=FAKE_TRAIN, skip_failed=True, progress=False)
    assert statuses["flaky"] == "skipped_failed"

    # Second pass: finished runs are not relaunched; the interrupted run resumes and finishes.
    statuses = runner.run_local(experiment, runs, tmp_path, train_argv=FAKE_TRAIN, progress=False)
    assert statuses == {"d8": "finished", "d16": "finished", "crash": "failed", "flaky": "finished"}
    calls = {name: (tmp_path / name / "calls.txt").read_text().count("call") for name in statuses}
    assert calls == {"d8": 1, "d16": 1, "crash": 2, "flaky": 2}
    assert json.loads((tmp_path / "flaky" / "summary.json").read_text())["resumed"] is True
    assert not (tmp_path / "flaky" / runner.FAILURE).exists()


def test_runner_records_exit_zero_without_summary(tmp_path):
    path = _write_experiment(tmp_path, "def sweep(arg=None):\n    return [{'name': 'a'}]\n")
    experiment = load_experiment(str(path))
    quiet = (sys.executable, "-c", "import sys")  # exits 0, writes nothing
    assert runner.run_local(experiment, experiment.runs(), tmp_path / "w", train_argv=quiet,
                            progress=False) == {"a": "failed"}
    assert "no finished summary.json" in json.loads((tmp_path / "w" / "a" / runner.FAILURE).read_text())["reason"]


def test_runner_refuses_to_mix_configs(tmp_path):
    experiment = load_experiment(f"{FAKE}:good=1")
    runner.open_sweep(experiment, experiment.runs(), tmp_path, "local")
    other = load_experiment(f"{FAKE}:good=1,lr=0.5")
    with pytest.raises(ValueError, match="holds the sweep"):
        runner.open_sweep(other, other.runs(), tmp_path, "local")
    changed = [RunSpec("d8", {"model.d_model": 12})]
    with pytest.raises(ValueError, match=r"(?s)trained with another config.*model.d_model: 8 → 12"):
        runner.open_sweep(experiment, changed, tmp_path, "local")
    foreign = tmp_path / "elsewhere"
    (foreign / "d8").mkdir(parents=True)
    (foreign / "d8" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not made by this sweep"):
        runner.open_sweep(experiment, experiment.runs(), foreign, "local")


def test_runner_refuses_runs_of_an_edited_experiment(tmp_path):
    body = "def sweep(arg=None):\n    return [{'name': 'a'}]\n"
    path = _write_experiment(tmp_path, body)
    experiment = load_experiment(str(path))
    runner.open_sweep(experiment, experiment.runs(), tmp_path / "w", "local")
    path.write_text(path.read_text().replace("'lr': 0.1", "'lr': 0.2"))
    edited = load_experiment(str(path))
    with pytest.raises(ValueError, match="train.lr: 0.1 → 0.2"):
        runner.open_sweep(edited, edited.runs(), tmp_path / "w", "local")


@pytest.mark.parametrize("launcher", ["tpu", "slurm"])
def test_launch_scripts(tmp_path, launcher):
    experiment = load_experiment(f"{FAKE}:good=1")
    opts = runner.parse_launcher_opts(launcher, "workdir=gs://bucket/sweep,python=python3.11")
    scripts = runner.write_launch_scripts(experiment, experiment.runs(), tmp_path, launcher, opts)
    assert [s.parent.name for s in scripts] == ["d8", "d16"]
    text = scripts[1].read_text()
    assert "{{" not in text and "--workdir=gs://bucket/sweep/d16" in text and "python3.11 -m cgpt_jax.train" in text
    assert "--config.model.d_model=16" in text
    for script in [*scripts, tmp_path / "submit_all.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)  # valid shell syntax
    submit = (tmp_path / "submit_all.sh").read_text()
    assert ("sbatch" if launcher == "slurm" else "bash") in submit and str(scripts[0]) in submit
    status = json.loads((tmp_path / runner.SWEEP_TABLE).read_text())["runs"]["d8"]["status"]
    assert status == "script_written"


def test_launcher_opts_errors():
    with pytest.raises(ValueError, match="KEY one of"):
        runner.parse_launcher_opts("slurm", "gpus=8")
    assert runner.parse_launcher_opts("slurm", "nodes=4,time=1:00:00")["nodes"] == "4"


def test_sweep_cli_dry_run_and_bad_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "cgpt_jax.sweep", f"--config={FAKE}:good=1",
                          f"--workdir={tmp_path}", "--dry_run"], capture_output=True, text=True, check=False, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("-m cgpt_jax.train") == 2 and "--config.model.n_layers=2" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "cgpt_jax.sweep", f"--config={tmp_path}/nope.py",
                          f"--workdir={tmp_path}"], capture_output=True, text=True, check=False, env=env, cwd=REPO)
    assert bad.returncode == 2 and "not found" in bad.stderr
