"""The CPU's theoretical peak comes from its instruction set, and is never reported below a measured matmul."""
from __future__ import annotations

import pytest

from cgpt_jax import devices


def _cpuinfo(flags: str, mhz: float | None = 2596.0, processors: int = 2) -> str:
    clock = "" if mhz is None else f"cpu MHz\t\t: {mhz}\n"
    return "\n".join(f"processor\t: {i}\nmodel name\t: Fake CPU\n{clock}flags\t\t: fpu sse sse2 {flags}\n"
                     for i in range(processors))


@pytest.mark.parametrize("flags, lanes", [
    ("avx avx2 fma avx512f avx512bw", 16),
    ("avx avx2 fma", 8),
    ("avx", 4),  # no FMA instructions: the 128-bit figure
    ("", 4),
])
def test_theoretical_peak_follows_the_vector_width(flags, lanes):
    peak, how = devices.theoretical_cpu_peak_flops(_cpuinfo(flags), cores=2)
    per_cycle = lanes * 2 * devices.FMA_UNITS_PER_CORE
    assert peak == pytest.approx(2 * 2596e6 * per_cycle)
    assert f"2 cores x 2596 MHz reported x {per_cycle} FLOP/cycle" in how


def test_cpufreq_maximum_is_preferred_and_a_missing_clock_gives_none():
    peak, how = devices.theoretical_cpu_peak_flops(_cpuinfo("avx2 fma"), max_freq_khz=3.5e6, cores=4)
    assert peak == pytest.approx(4 * 3500e6 * 32) and "3500 MHz max (cpufreq)" in how
    peak, how = devices.theoretical_cpu_peak_flops(_cpuinfo("avx2 fma", mhz=None), cores=4)
    assert peak is None and "no clock" in how


@pytest.mark.parametrize("measured, theoretical_known", [(100e9, True), (500e9, False)])
def test_a_theoretical_peak_below_the_measured_one_is_reported_unknown(monkeypatch, measured, theoretical_known):
    monkeypatch.setattr(devices, "measured_cpu_peak_flops", lambda: measured)
    monkeypatch.setattr(devices, "theoretical_cpu_peak_flops", lambda: (332e9, "2 cores x ..."))
    peaks = devices.cpu_peak_flops()
    assert peaks["measured"]["flops"] == measured
    if theoretical_known:
        assert peaks["theoretical"]["flops"] == 332e9
    else:
        assert peaks["theoretical"]["flops"] is None
        assert "below the measured 500 GFLOP/s" in peaks["theoretical"]["how"]


def test_bench_report_prints_an_unknown_peak_as_such():
    from cgpt_jax.bench import report

    peaks = {"theoretical": {"flops": None, "how": "332 GFLOP/s is below the measured 410"},
             "measured": {"flops": 410e9, "how": "best jnp.dot"}}
    result = {"label": "d16l2", "peaks": peaks, "devices": "1x cpu", "compute_dtype": "float32", "rounds": 1,
              "steps_per_round": 1, "frameworks": {"cgpt_jax": {
                  "params": 16_832, "tokens_per_sec": 1000.0, "mfu": {"theoretical": None, "measured": 0.5},
                  "compile_s": 2.0, "peak_memory_mib": 30.0}}}
    text = report.table([result])
    assert "| – / – | 0.50 / – |" in text.splitlines()[2]
    assert "theoretical: unknown (332 GFLOP/s is below the measured 410); measured: 410 GFLOP/s" in text
