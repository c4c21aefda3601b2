"""The analysis: reading run directories, flagging bad runs, grouping, and writing report, fit and plot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cgpt_jax.scaling import fits
from cgpt_jax.scaling.analysis import analyze
from cgpt_jax.scaling.report import write_outputs
from cgpt_jax.scaling.results import collect_runs

REPO = Path(__file__).resolve().parents[1]
LAW = {"a": 1e10, "b": -0.12, "c": 1.2}


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} contains {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _write_run(workdir: Path, name: str, n: float, tokens_per_param: float = 20.0, *, loss: float | None = None,
               noise: float = 0.0, experiment: str = "experiments/x.py", source: str = "synthetic",
               metrics: list[dict] | None = None, summary: bool = True) -> Path:
    run = workdir / name
    run.mkdir(parents=True)
    (run / "sweep_run.json").write_text(json.dumps({"experiment": experiment, "name": name, "config_arg": None,
                                                    "overrides": {}, "config": {}}))
    (run / "config.json").write_text(json.dumps({"data": {"source": source}, "model": {"vocab_size": 256}}))
    tokens = n * tokens_per_param
    flops = 6 * n * tokens
    if loss is None:
        loss = float(fits.predict_compute_law(LAW, flops)) * (1 + noise)
    rows = metrics if metrics is not None else [{"step": 1, "loss": 10.0}, {"step": 9, "loss": loss, "eval_loss": loss}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (run / "summary.json").write_text(json.dumps({
            "status": "finished", "step": 9, "final_eval_loss": loss, "final_train_loss": loss, "n_params": n * 1.5,
            "n_params_non_embedding": n, "tokens": tokens, "flops_cerebras": flops, "flops_palm": flops,
            "flops_6n": flops, "wall_time_s": 1.0, "tokens_per_sec": 1.0}))
    return run


def _ladder(workdir: Path, sizes=(1e4, 3e4, 1e5, 3e5, 1e6, 3e6), **kwargs):
    noise = np.random.default_rng(0).normal(0, 0.003, len(sizes))
    for i, n in enumerate(sizes):
        _write_run(workdir, f"n{i}", n, noise=noise[i], **kwargs)


def test_missing_and_empty_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no runs"):
        analyze(tmp_path)


def test_ladder_report_fit_and_plot(tmp_path):
    _ladder(tmp_path)
    analysis = analyze(tmp_path, n_bootstrap=100)
    law = analysis.compute_law
    assert law.fit.r2 > 0.98 and analysis.chinchilla_law is None
    assert law.fit.ci["b"][0] <= LAW["b"] <= law.fit.ci["b"][1]
    assert abs(law.backtest["rel_error"]) < 0.02
    assert analysis.monotonic["monotonic"]
    assert [row["multiple_of_largest_run"] for row in analysis.budgets] == [1, 10, 100, 1000]
    # Along a 20 tokens/param ladder the sweep's own allocation keeps D ≈ 20 N.
    assert analysis.budgets[2]["tokens"] / analysis.budgets[2]["n_params"] == pytest.approx(20, rel=0.01)
    paths = write_outputs(analysis, tmp_path)
    fit = _strict_json(paths["fit"])
    assert set(fit["fits"]) == {"L(C)"} and fit["excluded"] == {}
    report = paths["report"].read_text()
    assert "## L(C) = (C/a)^b + c" in report and "Backtest" in report and "L(N, D) is not identifiable" in report
    assert paths["plot"].stat().st_size > 10_000


def test_bad_runs_are_excluded_and_listed(tmp_path):
    _ladder(tmp_path)
    _write_run(tmp_path, "nan_loss", 2e6, loss=float("nan"))
    _write_run(tmp_path, "blew_up", 5e5, metrics=[{"step": 1, "loss": 6.0}, {"step": 5, "loss": float("inf")}])
    _write_run(tmp_path, "late_rise", 7e5, loss=3.0, metrics=[{"step": 5, "loss": 2.0, "eval_loss": 2.0},
                                                              {"step": 9, "loss": 3.0, "eval_loss": 3.0}])
    _write_run(tmp_path, "running", 4e6, summary=False)
    failed = _write_run(tmp_path, "crashed", 5e6, summary=False)
    (failed / "failure.json").write_text(json.dumps({"returncode": 3, "reason": "exited with code 3"}))
    (tmp_path / "sweep.json").write_text(json.dumps({"experiment": "experiments/x.py",
                                                     "runs": {"queued": {"status": "pending"}}}))
    analysis = analyze(tmp_path, n_bootstrap=50)
    assert analysis.compute_law.fit.n_points == 6
    problems = {r.name: " ".join(r.problems) for r in analysis.runs if not r.usable}
    assert set(problems) == {"nan_loss", "blew_up", "late_rise", "running", "crashed", "queued"}
    assert "non-finite final eval loss" in problems["nan_loss"]
    assert "diverged: loss=inf" in problems["blew_up"]
    assert "more than 1.2x" in problems["late_rise"]
    assert "unfinished" in problems["running"] and "exited with code 3" in problems["crashed"]
    assert "pending" in problems["queued"]
    paths = write_outputs(analysis, tmp_path / "out")
    fit = _strict_json(paths["fit"])  # NaN losses are written as null
    assert set(fit["excluded"]) == set(problems)
    assert "excluded: " in paths["report"].read_text()


def test_mixed_configs_refused_or_selected(tmp_path):
    _ladder(tmp_path)
    _write_run(tmp_path, "other", 1e5, experiment="experiments/y.py")
    with pytest.raises(ValueError, match="mixes runs of 2 sweeps"):
        analyze(tmp_path)
    analysis = analyze(tmp_path, experiment="experiments/x.py", n_bootstrap=20)
    assert len(analysis.runs) == 6
    with pytest.raises(ValueError, match="matches 0"):
        analyze(tmp_path, experiment="experiments/z.py")


def test_mixed_data_sources_refused(tmp_path):
    _ladder(tmp_path, sizes=(1e4, 1e5, 1e6))
    _write_run(tmp_path, "pile", 3e6, source="pile")
    with pytest.raises(ValueError, match="disagree on data.source"):
        analyze(tmp_path)


def test_too_few_runs(tmp_path):
    _ladder(tmp_path, sizes=(1e4, 1e5))
    _write_run(tmp_path, "nan_loss", 2e6, loss=float("nan"))
    with pytest.raises(ValueError, match="too few usable runs.*needs at least 3"):
        analyze(tmp_path)


def test_isoflop_sweep_fits_chinchilla(tmp_path):
    truth = {"E": 1.5, "A": 60.0, "alpha": 0.3, "B": 200.0, "beta": 0.3}
    rng = np.random.default_rng(3)
    for budget in (1e12, 1e13, 1e14):
        for j, scale in enumerate((0.3, 1.0, 3.0)):
            n = scale * np.sqrt(budget / 6 / 20)
            loss = float(fits.predict_chinchilla_law(truth, n, budget / 6 / n)) * (1 + rng.normal(0, 0.002))
            _write_run(tmp_path, f"c{budget:.0e}_{j}", n, tokens_per_param=budget / 6 / n / n, loss=loss)
    analysis = analyze(tmp_path, n_bootstrap=50)
    chin = analysis.chinchilla_law
    assert chin is not None and chin.fit.n_points == 9 and chin.backtest is not None
    assert chin.fit.ci["alpha"][0] <= truth["alpha"] <= chin.fit.ci["alpha"][1]
    assert analysis.compute_law.fit.n_points < 9  # the compute-optimal frontier only
    assert "compute-optimal frontier" in " ".join(analysis.notes)
    assert analysis.budgets[0]["allocation"].startswith("optimum of L(N,D)")
    write_outputs(analysis, tmp_path)


def test_collect_ignores_other_directories(tmp_path):
    _ladder(tmp_path, sizes=(1e4, 1e5, 1e6))
    (tmp_path / "plots").mkdir()
    assert len(collect_runs(tmp_path)) == 3


def test_reference_overlay_and_missing_reference(tmp_path):
    _ladder(tmp_path)
    with pytest.raises(FileNotFoundError, match="--reference_path"):
        analyze(tmp_path, reference="cerebras", reference_path=tmp_path / "missing.json")
    analysis = analyze(tmp_path, reference="cerebras", n_bootstrap=100)
    assert analysis.reference.law == {"a": 5.984e22, "b": -0.0737, "c": 0.5066}
    paths = write_outputs(analysis, tmp_path)
    report = paths["report"].read_text()
    assert "## Reference: Cerebras-GPT" in report and "inside our 95% intervals: 3 of 3 (a, b, c)" in report
    assert "cgpt_jax/reference/cerebras_gpt.json (package data)" in report  # the report names its source
    assert _strict_json(paths["fit"])["reference"]["eq1"]["b"] == -0.0737


def test_analyze_cli(tmp_path):
    _ladder(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "cgpt_jax.analyze", str(tmp_path), "--n_bootstrap=50",
                          "--reference=cerebras"], capture_output=True, text=True, check=False, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "L(C) = (C/a)^b + c" in out.stdout and "report:" in out.stdout
    assert (tmp_path / "scaling.png").is_file()
    # The overlay is always there: the published values ship with the package.
    assert "## Reference: Cerebras-GPT" in (tmp_path / "report.md").read_text()
    assert _strict_json(tmp_path / "fit.json")["reference"]["eq1"] == {"a": 5.984e22, "b": -0.0737, "c": 0.5066}
    empty = subprocess.run([sys.executable, "-m", "cgpt_jax.analyze", str(tmp_path / "none")],
                           capture_output=True, text=True, check=False, env=env, cwd=REPO)
    assert empty.returncode == 2 and "does not exist" in empty.stderr
