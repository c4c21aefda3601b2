"""One run builder: the loop, the planner and the benchmark compile the very same train step."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgpt_jax import plan, run_dir
from cgpt_jax.bench.runners import compile_train_step, random_tokens
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train import loop
from cgpt_jax.train.setup import build_run
from tests.helpers import tiny_config


def _program(compiled) -> str:
    """The compiled HLO without its debug information (the Python call sites of the operations)."""
    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    debug_tables = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames|\d+ .*)$")
    return "\n".join(line for line in text.splitlines() if not debug_tables.match(line))


def _config():
    config = tiny_config(data=2, fsdp=4)
    config.train.steps, config.train.eval_every = 2, 2
    return config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The Run that train_and_evaluate really trained with (captured from the loop), and its summary."""
    captured = []

    def spy(config, mesh, **kwargs):
        captured.append(build_run(config, mesh, **kwargs))
        return captured[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "build_run", spy)
        summary = loop.train_and_evaluate(_config(), str(tmp_path_factory.mktemp("run")), show_progress=False)
    assert len(captured) == 1
    return captured[0], summary


def test_planner_and_benchmark_compile_the_step_that_trains(trained_run):
    run, _ = trained_run
    devices = jax.devices()
    trained = _program(run.train_step.lower(run.abstract_state, run.abstract_batch()).compile())
    _, planned = plan.lowered_train_step(_config(), len(devices))
    benched = _program(compile_train_step(_config(), random_tokens(run.config), devices).compiled)
    assert _program(planned.compile()) == trained
    assert benched == trained
    assert "is-finite" in trained  # the non-finite guard is part of the compiled step


def test_the_run_rejects_a_non_finite_update():
    run = build_run(_config(), make_mesh(_config().mesh, jax.devices()))
    state = run.init_state()
    nan_grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params)
    updates, opt_state = jax.jit(run.tx.update)(nan_grads, state.opt_state, state.params)  # one program, not op by op
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    for new, old in zip(jax.tree.leaves(opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(new, old)


def test_summary_holds_the_contracts_keys(trained_run):
    _, summary = trained_run
    assert tuple(summary) == run_dir.SUMMARY_KEYS
    assert summary["status"] == run_dir.FINISHED and summary["step"] == 2
    assert np.isfinite(summary["final_eval_loss"]) and summary["tokens"] == 2 * 16 * 16
