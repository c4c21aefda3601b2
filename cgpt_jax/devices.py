"""Accelerator kinds: peak dense bf16 FLOP/s and memory per chip (vendor figures), and CPU peak measurement."""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax

from cgpt_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip, no sparsity
    memory_bytes: float  # HBM per chip


DEVICE_KINDS = {k.name: k for k in (
    DeviceKind("tpu_v4", 275e12, 32 * 2**30),
    DeviceKind("tpu_v5e", 197e12, 16 * 2**30),
    DeviceKind("tpu_v5p", 459e12, 95 * 2**30),
    DeviceKind("tpu_v6e", 918e12, 32 * 2**30),
    DeviceKind("a100", 312e12, 80 * 2**30),
    DeviceKind("h100", 989e12, 80 * 2**30),
    DeviceKind("h200", 989e12, 141 * 2**30),
)}

# Substrings of jax's device_kind (lower case, spaces removed) → our names; the first match wins.
_KIND_PATTERNS = (("tpuv4", "tpu_v4"), ("tpuv5lite", "tpu_v5e"), ("tpuv5e", "tpu_v5e"), ("tpuv5p", "tpu_v5p"),
                  ("tpuv5", "tpu_v5p"), ("tpuv6lite", "tpu_v6e"), ("tpuv6e", "tpu_v6e"), ("a100", "a100"),
                  ("h100", "h100"), ("h200", "h200"))


def kind_by_name(name: str) -> DeviceKind:
    if name not in DEVICE_KINDS:
        raise InputError(f"unknown device kind {name!r}; known: {', '.join(DEVICE_KINDS)}")
    return DEVICE_KINDS[name]


@functools.cache
def measured_cpu_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best f32 FLOP/s of an n×n matmul on this host's CPU: the 'measured peak' used for MFU on CPU."""
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    matmul = jax.jit(jnp.dot)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# FMA units per core: two on the x86 cores of the last decade (Intel since Haswell, AMD since Zen 2). An
# assumption, since /proc/cpuinfo does not tell; where a core has fewer, or narrower pipes than its
# instruction set (Zen 4 runs AVX-512 on 256-bit pipes), the figure below is too high, never too low.
FMA_UNITS_PER_CORE = 2
_CPUINFO = "/proc/cpuinfo"
_MAX_FREQ = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"  # kHz; absent in most VMs


def f32_lanes(cpu_flags: set[str]) -> int:
    """f32 values per vector register of the widest FMA instruction set in /proc/cpuinfo's flags."""
    if "avx512f" in cpu_flags:
        return 16
    if "avx2" in cpu_flags and "fma" in cpu_flags:
        return 8
    return 4  # SSE or NEON: 128 bits


def theoretical_cpu_peak_flops(cpuinfo: str | None = None, max_freq_khz: float | None = None,
                               cores: int | None = None) -> tuple[float | None, str]:
    """cores × clock × f32 lanes × 2 (an FMA is two FLOPs) × FMA_UNITS_PER_CORE, and how it was derived;
    (None, why) when /proc/cpuinfo gives no clock. Reads /proc/cpuinfo, the cpufreq maximum (the boost
    clock, preferred) and this process's CPU affinity for what is not given. Inside a VM the clock
    /proc/cpuinfo reports is the nominal one, which a boosting CPU exceeds: see `cpu_peak_flops`."""
    if cpuinfo is None:
        with open(_CPUINFO) as f:
            cpuinfo = f.read()
    if max_freq_khz is None and os.path.exists(_MAX_FREQ):
        with open(_MAX_FREQ) as f:
            max_freq_khz = float(f.read())
    cores = cores or len(os.sched_getaffinity(0))
    lines = [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
    flags = next((set(value.split()) for key, value in lines if key.strip() in ("flags", "Features")), set())
    reported_mhz = [float(value) for key, value in lines if key.strip() == "cpu MHz"]
    if max_freq_khz:
        mhz, clock = max_freq_khz / 1e3, "max (cpufreq)"
    elif reported_mhz:
        mhz, clock = max(reported_mhz), "reported"
    else:
        return None, "/proc/cpuinfo reports no clock"
    lanes = f32_lanes(flags)
    per_cycle = lanes * 2 * FMA_UNITS_PER_CORE
    return (cores * mhz * 1e6 * per_cycle,
            f"{cores} cores x {mhz:.0f} MHz {clock} x {per_cycle} FLOP/cycle "
            f"({lanes} f32 lanes x FMA x {FMA_UNITS_PER_CORE} FMA units)")


def cpu_peak_flops() -> dict[str, dict]:
    """The CPU peaks MFU is reported against: {'theoretical' | 'measured': {'flops', 'how'}}.

    A measured matmul faster than the theoretical peak proves the latter wrong (the CPU boosts above the
    reported clock, or has more FMA throughput than assumed): it is then reported as unknown (flops None)
    rather than giving an MFU above 1.
    """
    measured = measured_cpu_peak_flops()
    theoretical, how = theoretical_cpu_peak_flops()
    if theoretical is not None and theoretical < measured:
        how = (f"{how} = {theoretical / 1e9:.0f} GFLOP/s is below the measured {measured / 1e9:.0f} GFLOP/s, "
               f"so the clock or FLOP/cycle it assumes is wrong")
        theoretical = None
    return {"theoretical": {"flops": theoretical, "how": how},
            "measured": {"flops": measured, "how": "best jnp.dot of 2048x2048 f32"}}


def device_peak_flops(device: jax.Device) -> float:
    """Peak FLOP/s of one device: the vendor table for accelerators, a measured matmul on CPU."""
    if device.platform == "cpu":
        # Fake CPU devices (xla_force_host_platform_device_count) share the host's cores.
        return measured_cpu_peak_flops() / len(jax.local_devices(backend="cpu"))
    kind = device.device_kind.lower().replace(" ", "")
    for pattern, name in _KIND_PATTERNS:
        if pattern in kind:
            return DEVICE_KINDS[name].peak_flops
    raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; set "
                     f"--config.train.device_peak_flops=<FLOP/s per device> to get MFU.")
