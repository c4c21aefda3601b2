"""Every test process sees 8 fake CPU devices, so sharded code runs on CPU, and compiles without XLA's
backend optimisation passes and with XLA:CPU's older fusion emitters (flags set before jax loads;
subprocesses inherit them).

The suite compiles hundreds of small programs and runs each for a few steps, so the backend passes cost
more time than they save, and the MLIR fusion emitters take far longer to compile a program than the
older ones (docs/performance.md). The programs are the same (tests/test_run_builder.py
compares them); only their machine code is less optimised. The documented commands run with a user's
default flags (tests/test_docs_commands.py)."""
import os

import pytest

TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
                  "--xla_cpu_use_fusion_emitters=false")
for _flag in TEST_XLA_FLAGS:
    if _flag not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit the controller's setting
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cgpt_jax.host_memory import retain_freed_memory  # noqa: E402  (no jax import: must precede JAX's client)

retain_freed_memory()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; runs only with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: give --run-slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
