"""The isoFLOP and muP-vs-SP experiments through the real trainer: a few of each sweep's runs, shortened
to a few steps on the synthetic source, then each analysis (slow: about a minute; --run-slow)."""
import jax
import pytest

from cgpt_jax.experiments import cpu_isoflop, mup_vs_sp
from cgpt_jax.scaling import analysis, mup_vs_sp as compare
from cgpt_jax.train.loop import train_and_evaluate

STEP_DIVISOR = 50  # each run keeps 1/50 of its steps, so budgets keep their ratios


def _train(experiment, runs: list[dict], workdir) -> None:
    for run in runs:
        config = experiment.get_config(run["config_arg"])
        t = config.train
        config.data.source, config.data.synthetic_vocab_size, config.data.eval_batches = "synthetic", 512, 2
        t.steps = max(4, t.steps // STEP_DIVISOR)
        t.warmup_steps = 1
        train_and_evaluate(config, str(workdir / run["name"]), devices=jax.devices()[:1], show_progress=False)


@pytest.mark.slow
def test_isoflop_micro_end_to_end(tmp_path):
    runs = [r for r in cpu_isoflop.sweep() if r["name"].startswith(("c2.0e11", "c6.0e11"))]
    runs = [r for r in runs if r["name"].split("_")[1] in ("d24l2", "d32l2", "d40l2")]
    _train(cpu_isoflop, runs, tmp_path)
    result = analysis.analyze(tmp_path, params="total", n_bootstrap=50)
    budgets = result.allocation["approach2"]["budgets"]
    assert [row["runs"] for row in budgets] == [3, 3]
    assert budgets[1]["compute"] == pytest.approx(3 * budgets[0]["compute"], rel=0.1)


@pytest.mark.slow
def test_mup_vs_sp_micro_end_to_end(tmp_path):
    runs = [r for r in mup_vs_sp.sweep() if r["name"].split("-")[1] in ("d16l2", "d24l2", "d32l2")
            and r["name"].endswith(("lr0.004", "lr0.008", "lr0.032", "lr0.064"))]
    _train(mup_vs_sp, runs, tmp_path)
    grouped = compare.analyze(tmp_path, n_bootstrap=50)
    assert {g.value: len(g.analysis.usable) for g in grouped.groups} == {"mup": 3, "sp": 3}
    mup = next(g for g in grouped.groups if g.value == "mup")
    assert len({r.config["train"]["peak_lr"] for r in mup.analysis.usable}) == 1  # one base LR at every width
