"""Causal softmax attention on XLA:CPU through a C++ kernel (`cpu_attention.cc`), forward and backward.

XLA:CPU runs attention as separate dots, a softmax and many small copies; at the CPU ladder's shapes
(head dim 16, 128 positions) the copies cost more than the arithmetic. The kernel computes each
(batch, head) pair's causal triangle in one pass and saves each query's largest logit and softmax
denominator, so the backward pass recomputes the probabilities instead of storing them (as
FlashAttention does).
Against float64, its values and gradients are as accurate as `base.attend`'s in float32 (within 2.5x of
its error, ≈1x at most shapes), also where one key dominates a row (tests/test_cpu_attention.py): the
backward pass recomputes the forward probabilities exactly and takes the softmax row term as Σ p·dL/dp.

The kernel is compiled for this machine (`-march=native`) on first use by the C++ compiler in `$CXX`
(default `c++`) against the XLA FFI headers that jaxlib ships, and cached under
`$CGPT_JAX_CACHE` (default `~/.cache/cgpt_jax`)/kernels, keyed by the source, the compiler and its
version, the flags, jaxlib's version and the CPU. `build()` and `load()` raise `KernelUnavailable` with the reason when that fails (no compiler, a
compile error); `fused` attention then runs JAX's XLA implementation instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
COMPILE_TIMEOUT_S = 300
FORWARD_TARGET, BACKWARD_TARGET = "cgpt_causal_attention_forward", "cgpt_causal_attention_backward"


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built or loaded on this machine; the message says why."""


def cache_dir() -> pathlib.Path:
    root = os.environ.get("CGPT_JAX_CACHE") or pathlib.Path.home() / ".cache" / "cgpt_jax"
    return pathlib.Path(root) / "kernels"


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: the CPU's feature flags where Linux lists them."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelUnavailable(f"running {compiler} --version failed: {error}") from error


def library_path(compiler: str) -> pathlib.Path:
    key = "\n".join([SOURCE.read_text(), compiler, _compiler_version(compiler), *FLAGS, jaxlib.__version__,
                     _cpu_fingerprint()])
    return cache_dir() / f"cpu_attention_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _compile(compiler: str, target: pathlib.Path) -> None:
    # Compile next to the target and rename: processes that build at the same time never load a
    # half-written library.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=target.parent)
    except OSError as error:
        raise KernelUnavailable(f"cannot write the kernel cache {target.parent} ({error}); set $CGPT_JAX_CACHE "
                                "to a writable directory") from error
    os.close(fd)
    try:
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", partial]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelUnavailable(f"compiling {SOURCE.name} failed ({' '.join(command)}): {error}") from error
        if result.returncode != 0:
            raise KernelUnavailable(f"compiling {SOURCE.name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o755 & ~umask)  # mkstemp made it private; a shared cache serves every user
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def compiler() -> str | None:
    """The C++ compiler that builds the kernel: `$CXX` (default `c++`) on PATH, or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def build() -> pathlib.Path:
    """The kernel's shared library for this machine: compiled on first use, then taken from the cache."""
    compiler_path = compiler()
    if compiler_path is None:
        raise KernelUnavailable(f"no C++ compiler: {os.environ.get('CXX', 'c++')!r} is not on PATH "
                                "(install g++ or clang, or set $CXX)")
    path = library_path(compiler_path)
    if not path.exists():
        _compile(compiler_path, path)
    return path


@functools.cache
def load() -> pathlib.Path:
    """Build the kernel and register it with XLA:CPU, once per process; returns the library's path."""
    path = build()
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as error:
        raise KernelUnavailable(f"loading {path} failed: {error}") from error
    jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(library.CausalAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(library.CausalAttentionBackward), platform="cpu")
    return path


def applies(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array) -> bool:
    """The kernel's domain: CPU, float32, one key/value head per query head."""
    return (jax.default_backend() == "cpu" and q_BxLxHxK.shape == k_BxLxGxK.shape == v_BxLxGxK.shape
            and all(x.dtype == jnp.float32 for x in (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)))


def _forward(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
             scale: float) -> tuple[jax.Array, jax.Array]:
    batch, length, heads, _ = q_BxLxHxK.shape
    out_types = (jax.ShapeDtypeStruct(q_BxLxHxK.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, length, 2), jnp.float32))
    forward = jax.ffi.ffi_call(FORWARD_TARGET, out_types, vmap_method="sequential")
    return forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, scale: float) -> jax.Array:
    """softmax(scale·QKᵀ, causal)·V → [B, L, H, K]; call `load()` first."""
    return _forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale)[0]


def _causal_attention_fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale):
    o_BxLxHxK, stats_BxHxLx2 = _forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale)
    return o_BxLxHxK, (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, o_BxLxHxK, stats_BxHxLx2)


def _causal_attention_bwd(scale, residuals, do_BxLxHxK):
    q_BxLxHxK = residuals[0]
    out_types = (jax.ShapeDtypeStruct(q_BxLxHxK.shape, jnp.float32),) * 3
    backward = jax.ffi.ffi_call(BACKWARD_TARGET, out_types, vmap_method="sequential")
    return tuple(backward(*residuals, do_BxLxHxK, scale=np.float32(scale)))


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)
