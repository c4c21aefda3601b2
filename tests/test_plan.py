"""The planner compiles the real train step for a target mesh on fake devices, allocating nothing."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=experiments/cerebras_gpt.py:size=tiny", "--config.model.vocab_size=256"]


def _plan(*args: str) -> subprocess.CompletedProcess:
    env = one_device_env()  # the planner starts itself again with the fake devices of its target mesh
    env.pop("CGPT_PLAN_DEVICES", None)
    return subprocess.run([sys.executable, "-m", "cgpt_jax.plan", *TINY, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_plan_reports_memory_flops_and_fit():
    result = _plan("--mesh=data=2,fsdp=4,tensor=2", "--device=h100", "--mfu=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    assert plan["target"]["devices"] == 16 and plan["target"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 2}
    memory = plan["memory_per_device_gib"]
    params_bytes = plan["config"]["params"] * 4
    # f32 parameters split 8 ways (fsdp × tensor) for every sharded tensor: at most the full size / 8
    # plus the small replicated ones; Adam keeps two moments of the same shapes.
    assert memory["parameters"] * 2**30 < params_bytes / 4
    assert abs(memory["optimizer_state"] - 2 * memory["parameters"]) < 1e-3
    assert memory["activations_and_workspace"] > 0 and plan["fits"] is True and plan["suggestions"] == []
    tokens_per_step = 16 * 128
    assert plan["predicted_tokens_per_sec"] * plan["predicted_step_s"] == pytest.approx(tokens_per_step, rel=1e-3)
    step_flops = plan["flops_per_step_palm"]
    assert plan["predicted_step_s"] == pytest.approx(step_flops / (16 * 989e12 * 0.5), rel=1e-3)


def test_plan_refuses_a_mismatched_mesh():  # an unknown device: tests/test_bad_inputs.py
    result = _plan("--mesh=fsdp=8", "--devices=16")
    assert result.returncode != 0 and "has 8 devices but 16 are available" in result.stderr


def test_planned_memory_matches_a_real_run_on_the_same_devices():
    """cgpt_jax.tools.plan_check: the planner's per-device memory for a 16M-parameter model on 8 fake devices
    (fsdp=8) against a real run there. State shards and the executable's buffers agree to rounding; the
    growth of the process's peak resident memory over init and two steps (an OS measurement) is within 15%
    (8% under for 111M: docs/performance.md)."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "cgpt_jax.tools.plan_check", "--config=experiments/cpu_bench.py:size=d256l4_v50257",
               "--devices=8", "--config.mesh.fsdp=8", "--config.mesh.data=1"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["state"]["planned_over_measured"] == pytest.approx(1.0, abs=0.03)  # GiB rounded to 3 places
    assert result["step"]["planned_over_measured"] == pytest.approx(1.0, abs=0.01)
    assert 0.85 <= result["process"]["planned_over_measured"] <= 1.15
