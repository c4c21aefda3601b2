"""Compiling, caching and loading the C++ kernels of this package for XLA:CPU.

A kernel is one C++ source in this folder (with the shared header `cpu_common.h`), compiled for this
machine (`-march=native`) on first use by the C++ compiler in `$CXX` (default `c++`) against the XLA FFI
headers that jaxlib ships, and cached under `$CGPT_JAX_CACHE` (default `~/.cache/cgpt_jax`)/kernels,
keyed by the sources, the compiler and its version, the flags, jaxlib's version and the CPU. `build`
and `load` raise `KernelUnavailable` with the reason when that fails (no compiler, a compile error);
each kernel's caller then runs its pure-JAX equivalent instead.
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
import warnings
from collections.abc import Callable

import jax
import jaxlib

HERE = pathlib.Path(__file__).parent
HEADERS = (HERE / "cpu_common.h",)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
COMPILE_TIMEOUT_S = 300


class KernelUnavailable(RuntimeError):
    """A CPU kernel cannot be built or loaded on this machine; the message says why."""


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
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelUnavailable(f"running {compiler} --version failed: {error}") from error


def library_path(source: pathlib.Path, compiler: str) -> pathlib.Path:
    key = "\n".join([source.read_text(), *(h.read_text() for h in HEADERS), compiler, _compiler_version(compiler),
                     *FLAGS, jaxlib.__version__, _cpu_fingerprint()])
    return cache_dir() / f"{source.stem}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _compile(source: pathlib.Path, compiler: str, target: pathlib.Path) -> None:
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
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HERE}", str(source), "-o", partial]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelUnavailable(f"compiling {source.name} failed ({' '.join(command)}): {error}") from error
        if result.returncode != 0:
            raise KernelUnavailable(f"compiling {source.name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o755 & ~umask)  # mkstemp made it private; a shared cache serves every user
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def compiler() -> str | None:
    """The C++ compiler that builds the kernels: `$CXX` (default `c++`) on PATH, or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def build(source: pathlib.Path) -> pathlib.Path:
    """`source`'s shared library for this machine: compiled on first use, then taken from the cache."""
    compiler_path = compiler()
    if compiler_path is None:
        raise KernelUnavailable(f"no C++ compiler: {os.environ.get('CXX', 'c++')!r} is not on PATH "
                                "(install g++ or clang, or set $CXX)")
    path = library_path(source, compiler_path)
    if not path.exists():
        _compile(source, compiler_path, path)
    return path


@functools.cache
def load(source: pathlib.Path, targets: tuple[tuple[str, str], ...]) -> pathlib.Path:
    """Build `source` and register each (XLA target name, exported handler symbol) with XLA:CPU, once per
    process; returns the library's path."""
    path = build(source)
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as error:
        raise KernelUnavailable(f"loading {path} failed: {error}") from error
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return path


def loads(load_kernel: Callable[[], object], fallback: str) -> bool:
    """Whether `load_kernel()` registers its kernel; where it cannot, warns "`fallback`: why" and returns
    False, and the caller runs its pure-JAX equivalent."""
    try:
        load_kernel()
        return True
    except KernelUnavailable as error:
        warnings.warn(f"{fallback}: {error}", stacklevel=3)
        return False
