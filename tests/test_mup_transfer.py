"""The transfer experiment's sweep (experiments/mup_transfer.py) and its analysis (cgpt_jax/scaling/transfer.py)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cgpt_jax.scaling import transfer
from cgpt_jax.scaling.experiment import load_experiment
from experiments import mup_transfer

REPO = Path(__file__).resolve().parents[1]


def test_sweep_covers_widths_learning_rates_and_both_parameterizations(monkeypatch):
    monkeypatch.chdir(REPO)
    runs = load_experiment("experiments/mup_transfer.py").runs()  # every run's config is built and checked
    assert len(mup_transfer.WIDTHS) >= 4 and {run.name.split("-")[0] for run in runs} == {"sp", "mup"}
    assert len(runs) == len(mup_transfer.WIDTHS) * sum(len(lrs) for lrs in mup_transfer.LRS.values())
    sp = mup_transfer.get_config("width=64,lr=0.004,param=sp")
    mup = mup_transfer.get_config("width=64,lr=0.004,param=mup")
    assert (sp.model.parameterization, sp.model.init_std, sp.train.peak_lr) == ("sp", 0.02, 0.004)
    assert (mup.model.parameterization, mup.model.init_std, mup.train.peak_lr) == ("mup", 0.08, 0.004)
    assert (mup.model.mup_base_d_model, mup.model.mup_base_d_ff) == (16, 64)  # the narrowest width is the base
    for config in (sp, mup):  # everything but the parameterization is the same recipe
        assert (config.model.d_model, config.model.n_heads, config.train.steps) == (64, 2, mup_transfer.STEPS)
    subset = mup_transfer.sweep("widths=16/64,lrs=0.002/0.008,params=mup")
    assert [run["name"] for run in subset] == ["mup-d16-lr0.002", "mup-d16-lr0.008", "mup-d64-lr0.002",
                                               "mup-d64-lr0.008"]
    with pytest.raises(ValueError, match="params='up'"):
        mup_transfer.sweep("params=up")
    with pytest.raises(ValueError, match="param='xp'"):
        mup_transfer.get_config("param=xp")


def fake_run(workdir: Path, param: str, width: int, lr: float, loss: float | None) -> None:
    """A run directory as the sweep leaves it; loss None: the trainer never finished."""
    run = workdir / f"{param}-d{width}-lr{lr:g}"
    run.mkdir(parents=True)
    (run / "sweep_run.json").write_text(json.dumps({"experiment": "experiments/mup_transfer.py"}))
    (run / "config.json").write_text(json.dumps({"model": {"parameterization": param, "d_model": width},
                                                 "train": {"peak_lr": lr}}))
    if loss is not None:
        (run / "summary.json").write_text(json.dumps({
            "status": "finished", "final_eval_loss": loss, "n_params": 1e5, "n_params_non_embedding": 8e4,
            "tokens": 1e6, "flops_cerebras": 1e12, "flops_palm": 1e12, "flops_6n": 1e12}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 6.0}) + "\n")


def test_analysis_finds_each_widths_optimum(tmp_path):
    lrs = [0.002, 0.004, 0.008, 0.016]
    # muP: every width's optimum at 0.004 (d64: 0.008, adjacent); SP: the optimum moves down as width grows.
    grid = {("mup", 16): [4.0, 3.5, 3.7, 4.5], ("mup", 64): [3.6, 3.2, 3.1, 3.3],
            ("sp", 16): [4.2, 3.9, 3.6, 3.5], ("sp", 64): [3.3, 3.4, 3.8, math.nan]}
    for (param, width), losses in grid.items():
        for lr, loss in zip(lrs, losses):
            fake_run(tmp_path, param, width, lr, loss)
    fake_run(tmp_path, "sp", 32, 0.002, None)  # unfinished: no loss, no optimum
    result, paths = transfer.write_outputs(tmp_path, tmp_path / "out")
    mup, sp = result["mup"], result["sp"]
    assert mup["lrs"] == lrs
    assert [w["best_lr"] for w in mup["widths"].values()] == [0.004, 0.008]
    assert mup["spread"] == 1 and mup["transfers"]
    assert [w["best_lr"] for w in sp["widths"].values()] == [0.016, None, 0.002]
    assert sp["spread"] == 3 and not sp["transfers"]
    assert sp["widths"][64]["losses"][3] is None  # diverged (non-finite loss)
    # Parabola through (log2 lr, loss) = (-8.97, 4.0), (-7.97, 3.5), (-6.97, 3.7): vertex 0.35 steps above 0.004.
    assert mup["widths"][16]["interpolated_lr"] == pytest.approx(0.004 * 2 ** (0.3 / 1.4), rel=1e-6)
    assert sp["widths"][16]["interpolated_lr"] is None  # optimum at the grid's edge
    report = paths["report"].read_text()
    assert "| 16 | 4.0000 | **3.5000** | 3.7000 | 4.5000 | 0.004 |" in report
    assert "MUP: optima span 1 grid point(s) across widths: transfers." in report
    assert "does not transfer (optimum at the edge of the grid for width 16, 64: it may lie beyond)." in report
    assert "sp-d32-lr0.002: unfinished" in report
    assert json.loads(paths["json"].read_text())["optima"]["sp"]["spread"] == 3
    assert paths["plot"].stat().st_size > 10_000
    cli = subprocess.run([sys.executable, "-m", "cgpt_jax.scaling.transfer", str(tmp_path), f"--out={tmp_path}/cli"],
                         capture_output=True, text=True, check=False, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cli.returncode == 0, cli.stderr
    assert "mup: best LR per width d16: 0.004, d64: 0.008; optima span 1 grid point(s) (transfers)" in cli.stdout
    assert (tmp_path / "cli" / "transfer.png").is_file()
