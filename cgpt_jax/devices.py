"""Accelerator kinds: peak dense bf16 FLOP/s and memory per chip (vendor figures), and CPU peak measurement."""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax


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
        raise ValueError(f"unknown device kind {name!r}; known: {', '.join(DEVICE_KINDS)}")
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


def theoretical_cpu_peak_flops(flops_per_cycle: int = 32) -> tuple[float, str]:
    """Cores × clock × f32 FLOPs per cycle per core, from /proc/cpuinfo, and how it was derived.

    32 FLOPs/cycle is two 256-bit FMA pipes (x86 with AVX2/FMA: Zen 2-4, Intel client cores; Zen 4
    runs AVX-512 on the same two 256-bit pipes). The clock is the one the kernel reports, which inside
    a VM is the nominal clock: a boosting CPU can run matmuls above this figure.
    """
    with open("/proc/cpuinfo") as cpuinfo:
        mhz = [float(line.split(":")[1]) for line in cpuinfo if line.startswith("cpu MHz")]
    if not mhz:
        raise ValueError("/proc/cpuinfo reports no clock; pass the theoretical peak explicitly")
    cores = len(os.sched_getaffinity(0))
    peak = cores * max(mhz) * 1e6 * flops_per_cycle
    return peak, f"{cores} cores x {max(mhz):.0f} MHz x {flops_per_cycle} FLOP/cycle"


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
