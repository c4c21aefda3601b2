"""muP against SP: the sweep's run list, the learning rate each parameterization's tuning picks, the report."""
import json
import math

import numpy as np
import pytest

from cgpt_jax.errors import InputError
from cgpt_jax.experiments import cpu_ladder, mup_vs_sp
from cgpt_jax.scaling import fits, mup_vs_sp as compare
from cgpt_jax.scaling.report import write_grouped_outputs
from tests.scaling_fixtures.run_dirs import write_run


def test_sweep_is_the_ladder_at_every_grid_learning_rate_under_both():
    runs = mup_vs_sp.sweep()
    assert len(runs) == len(mup_vs_sp.SIZES) * sum(len(lrs) for lrs in mup_vs_sp.LRS.values())
    assert len({run["name"] for run in runs}) == len(runs)
    for run in runs[:len(runs) // len(mup_vs_sp.SIZES) * 2]:  # the two narrowest rungs
        config = mup_vs_sp.get_config(run["config_arg"])
        size = run["config_arg"].split(",")[0].split("=")[1]
        ladder = cpu_ladder.get_config(f"size={size}")
        # The ladder's rung exactly, apart from the parameterization and the learning rate.
        assert (config.model.d_model, config.train.steps, config.train.global_batch_size) == (
            ladder.model.d_model, ladder.train.steps, ladder.train.global_batch_size)
        param = config.model.parameterization
        assert config.train.peak_lr in mup_vs_sp.LRS[param]
        if param == "mup":  # the narrowest rung is muP's base width
            assert (config.model.mup_base_d_model, config.model.init_std) == (16, 0.08)
        else:
            assert config.model.init_std == 0.02
    with pytest.raises(InputError, match="param='xp'"):
        mup_vs_sp.get_config("param=xp")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """Runs whose loss follows a law in compute times a parabola in log2(LR / optimum): under SP the optimum
    halves with each doubling of width, under muP it stays at the base width's (which is off the grid
    points at 0.09)."""
    workdir = tmp_path_factory.mktemp("mup_vs_sp")
    law = {"sp": {"a": 1e9, "b": -0.1, "c": 1.0}, "mup": {"a": 1e9, "b": -0.12, "c": 1.0}}
    for run in mup_vs_sp.sweep():
        config = mup_vs_sp.get_config(run["config_arg"])
        m, t = config.model, config.train
        n = 12 * m.d_model ** 2 * m.n_layers
        flops = 6.0 * n * 20 * n
        best = 0.09 if m.parameterization == "mup" else 8e-3 * 16 / m.d_model
        loss = fits.predict_compute_law(law[m.parameterization], flops) + 0.02 * math.log2(t.peak_lr / best) ** 2
        write_run(workdir, run["name"], n_params=n, tokens=20.0 * n, flops=flops, loss=loss,
                  experiment="experiments/mup_vs_sp.py",
                  model={"parameterization": m.parameterization, "d_model": m.d_model},
                  train={"peak_lr": t.peak_lr})
    return workdir


def test_each_parameterization_gets_its_own_tuning(sweep_dir):
    grouped = compare.analyze(sweep_dir, n_bootstrap=100)
    chosen = {g.value: {int(r.config["model"]["d_model"]): r.config["train"]["peak_lr"] for r in g.analysis.usable}
              for g in grouped.groups}
    widths = [cpu_ladder.SIZES[size][0] for size in mup_vs_sp.SIZES]
    assert chosen["mup"] == {w: 0.064 for w in widths}  # the narrowest width's best, at every width
    sp_grid = np.array(mup_vs_sp.LRS["sp"])
    assert chosen["sp"] == {w: float(sp_grid[np.argmin(np.abs(np.log2(sp_grid / (8e-3 * 16 / w))))])
                            for w in widths}  # each width's own best
    rows = {row["group"]: row for row in grouped.comparison}
    assert rows["mup"]["b"] < rows["sp"]["b"] < 0
    for row in rows.values():
        assert row["fitted_runs"] == len(widths) and row["backtest_rel_error"] is not None

    paths = write_grouped_outputs(grouped, sweep_dir)
    report = paths["report"].read_text()
    assert "| model.parameterization | runs fitted | b | b 95% CI | R² | residual spread | backtest |" in report
    assert "muP: base learning rate 0.064, the best at the narrowest width, kept at every width." in report
    assert json.loads(paths["fit"].read_text())["notes"] == grouped.notes
    assert paths["plot"].stat().st_size > 10_000
