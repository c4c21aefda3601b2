"""End to end with the real trainer: a micro sweep of three models, then the analysis (about 40 s)."""
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import one_device_env


REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "tests/scaling_fixtures/micro_experiment.py"


def test_micro_sweep_then_analysis(tmp_path):
    env = one_device_env(PYTHONPATH=str(REPO))
    workdir = tmp_path / "sweep"
    sweep = [sys.executable, "-m", "cgpt_jax.sweep", f"--config={EXPERIMENT}", f"--workdir={workdir}"]
    out = subprocess.run(sweep, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    table = json.loads((workdir / "sweep.json").read_text())
    assert {name: run["status"] for name, run in table["runs"].items()} == {
        "d16": "finished", "d32": "finished", "d64": "finished"}

    again = subprocess.run(sweep, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    assert again.returncode == 0 and again.stdout.count("finished already, skipped") == 3

    out = subprocess.run([sys.executable, "-m", "cgpt_jax.analyze", str(workdir), "--n_bootstrap=50"],
                         capture_output=True, text=True, check=False, env=env, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    fit = json.loads((workdir / "fit.json").read_text())
    assert [r["usable"] for r in fit["runs"]] == [True, True, True], fit["excluded"]
    assert fit["fits"]["L(C)"]["n_points"] == 3
    summary = json.loads((workdir / "d64" / "summary.json").read_text())
    assert fit["runs"][-1]["flops"]["cerebras"] == summary["flops_cerebras"]  # the trainer's one FLOP count
    assert "## L(C) = (C/a)^b + c" in (workdir / "report.md").read_text()
    assert (workdir / "scaling.png").stat().st_size > 10_000
