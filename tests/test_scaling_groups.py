"""The analysis split by a config field: one L(C) per attention variant, one plot, one comparison table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cgpt_jax.scaling import fits
from cgpt_jax.scaling.groups import UNSET, analyze_groups
from cgpt_jax.scaling.report import write_grouped_outputs

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "experiments/attention_variants.py:sizes=a/b"
SIZES = (1e4, 3e4, 1e5, 3e5, 1e6)
# variant -> (its law, its FLOPs relative to dense at the same size, its tokens/s)
VARIANTS = {
    "dense": ({"a": 1e10, "b": -0.12, "c": 1.2}, 1.0, 1000.0),
    "mqa": ({"a": 1e10, "b": -0.10, "c": 1.2}, 0.98, 1500.0),
    "rope": ({"a": 1e10, "b": -0.15, "c": 1.2}, 0.95, 800.0),
}


def _config(attention: str) -> dict:
    return {"data": {"source": "stdlib", "tokenizer": "bpe(vocab=512)"},
            "model": {"attention": attention, "vocab_size": 512}}


def _write_run(workdir: Path, name: str, attention: str, n: float, law: dict, flops_factor: float,
               tokens_per_sec: float, *, started: bool = True, noise: float = 0.0) -> None:
    """A run directory as the runner (sweep_run.json) and the trainer (config.json, metrics.jsonl,
    summary.json) leave it; `started=False` leaves only what the runner writes before launching."""
    run = workdir / name
    run.mkdir(parents=True)
    (run / "sweep_run.json").write_text(json.dumps({
        "experiment": EXPERIMENT, "name": name, "config_arg": f"size={name},variant={attention}",
        "overrides": {}, "config": _config(attention)}))
    if not started:
        return
    (run / "config.json").write_text(json.dumps(_config(attention)))
    tokens = 20 * n
    flops = 6 * n * tokens * flops_factor
    loss = float(fits.predict_compute_law(law, flops)) * (1 + noise)
    rows = [{"step": 1, "loss": 10.0}, {"step": 9, "loss": loss, "eval_loss": loss}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({
        "status": "finished", "step": 9, "final_eval_loss": loss, "final_train_loss": loss, "skipped_steps": 0,
        "n_params": 1.5 * n, "n_params_non_embedding": n, "tokens": tokens, "flops_cerebras": flops,
        "flops_palm": flops, "flops_6n": 6 * n * tokens, "wall_time_s": 1.0, "tokens_per_sec": tokens_per_sec}))


def _sweep(workdir: Path) -> None:
    noise = np.random.default_rng(0).normal(0, 0.002, len(SIZES))
    for variant, (law, factor, speed) in VARIANTS.items():
        for i, n in enumerate(SIZES):
            _write_run(workdir, f"{variant}-n{i}", variant, n, law, factor, speed + 10 * i, noise=noise[i])


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} contains {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_one_curve_per_variant_and_a_comparison_table(tmp_path):
    _sweep(tmp_path)
    grouped = analyze_groups(tmp_path, "model.attention", n_bootstrap=100)
    assert [g.value for g in grouped.groups] == ["dense", "mqa", "rope"]
    # rope reaches the least compute at the largest size, so the comparison happens there.
    assert grouped.common_compute == pytest.approx(6 * 20 * SIZES[-1] ** 2 * 0.95)
    rows = {row["group"]: row for row in grouped.comparison}
    for variant, (law, _, speed) in VARIANTS.items():
        row = rows[variant]
        assert row["fitted_runs"] == row["runs"] == len(SIZES)
        assert row["b_ci95"][0] <= law["b"] <= row["b_ci95"][1]
        assert row["r2"] > 0.99
        assert row["measured_run"] == f"{variant}-n{len(SIZES) - 1}"
        truth = float(fits.predict_compute_law(law, grouped.common_compute))
        assert row["fitted_loss"] == pytest.approx(truth, rel=0.01)
        assert row["fitted_loss_ci95"][0] < row["fitted_loss"] < row["fitted_loss_ci95"][1]
        assert row["tokens_per_sec_mean"] == pytest.approx(speed + 20) and row["tokens_per_sec_runs"] == 5
    assert rows["rope"]["fitted_loss"] < rows["dense"]["fitted_loss"] < rows["mqa"]["fitted_loss"]

    paths = write_grouped_outputs(grouped, tmp_path / "out")
    fit = _strict_json(paths["fit"])
    assert fit["group_by"] == "model.attention" and fit["group"] == EXPERIMENT
    assert [row["group"] for row in fit["comparison"]] == ["dense", "mqa", "rope"]
    assert fit["groups"]["mqa"]["fits"]["L(C)"]["n_points"] == len(SIZES)
    report = paths["report"].read_text()
    assert "| model.attention | runs fitted | b | b 95% CI | R² |" in report
    for variant in VARIANTS:
        assert f"| {variant} | 5 of 5 | {rows[variant]['b']:.4g} |" in report
        assert f"## model.attention = {variant}" in report
    assert paths["plot"].stat().st_size > 10_000


def test_small_unstarted_and_diverged_groups(tmp_path):
    _sweep(tmp_path)
    law, factor, _ = VARIANTS["dense"]
    # Two finished runs are too few for L(C); a run the runner set up but never launched keeps its planned
    # group (sweep_run.json), and a diverged run is excluded but its throughput still counts.
    _write_run(tmp_path, "alibi-n0", "alibi", SIZES[0], law, factor, 700.0)
    _write_run(tmp_path, "alibi-n1", "alibi", SIZES[1], law, factor, 900.0)
    _write_run(tmp_path, "alibi-n2", "alibi", SIZES[2], law, factor, 0.0, started=False)
    _write_run(tmp_path, "alibi-n3", "alibi", SIZES[3], law, factor, 800.0, noise=float("nan"))
    grouped = analyze_groups(tmp_path, "model.attention", n_bootstrap=20)
    row = next(row for row in grouped.comparison if row["group"] == "alibi")
    assert row["runs"] == 4 and row["fitted_runs"] == 0 and "too few usable runs to fit (2 of 4)" in row["problem"]
    assert row["tokens_per_sec_mean"] == pytest.approx(800.0) and row["tokens_per_sec_runs"] == 3
    assert "b" not in row
    report = write_grouped_outputs(grouped, tmp_path / "out")["report"].read_text()
    assert "| alibi | 0 of 4 | — |" in report and "- alibi: " in report
    assert "## model.attention = alibi" not in report


def test_runs_without_the_field_and_bad_fields(tmp_path):
    _sweep(tmp_path)
    (tmp_path / "sweep.json").write_text(json.dumps({"experiment": EXPERIMENT, "runs": {"queued": {}}}))
    grouped = analyze_groups(tmp_path, "model.attention", n_bootstrap=20)
    assert [g.value for g in grouped.groups] == [UNSET, "dense", "mqa", "rope"]
    assert grouped.groups[0].analysis is None and "queued (pending" in grouped.groups[0].problem
    with pytest.raises(ValueError, match="no run records this field"):
        analyze_groups(tmp_path, "model.attentoin")
    with pytest.raises(ValueError, match="--flops"):
        analyze_groups(tmp_path, "model.attention", flops="7n")


def test_group_by_cli(tmp_path):
    _sweep(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "cgpt_jax.analyze", str(tmp_path), "--group_by=model.attention",
                          "--n_bootstrap=50"], capture_output=True, text=True, check=False, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "per model.attention" in out.stdout and "  rope: b=" in out.stdout and "report:" in out.stdout
    assert (tmp_path / "scaling.png").is_file() and "group_by" in _strict_json(tmp_path / "fit.json")
