"""cgpt_jax/host_memory.py: weights moved onto huge pages keep their values and lie on huge pages, small ones
too, and the generator moves its weights."""
from __future__ import annotations

import pathlib
import platform
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import host_memory
from cgpt_jax.infer import Generator
from cgpt_jax.model import GPT
from tests.helpers import tiny_config


def transparent_huge_pages() -> str:
    """The kernel's THP mode ('always', 'madvise', 'never'), or why there is none to use here."""
    try:
        mode = re.search(r"\[(\w+)\]", pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text())
    except OSError:
        return "absent"
    release = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    if release < (6, 1):
        return "no MADV_COLLAPSE before Linux 6.1"
    if re.search(r"^THP_enabled:\s*0", pathlib.Path("/proc/self/status").read_text(), re.MULTILINE):
        return "disabled for this process"
    return mode.group(1)


def huge_page_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address`."""
    lines = pathlib.Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(transparent_huge_pages() not in ("always", "madvise"),
                    reason=f"transparent huge pages cannot be asked for here ({transparent_huge_pages()})")
def test_arrays_move_onto_huge_pages_with_their_values():
    """Every array, the small ones too (a 0.6 MB int8 weight holds no whole 2 MiB page of its own), lies on
    huge pages with its values; an array met twice is copied once; other leaves stay."""
    rng = np.random.default_rng(0)
    values = {"float": rng.normal(size=(3 << 20,)).astype(np.float32),  # 12 MiB
              "int8": rng.integers(-127, 128, size=(768, 768)).astype(np.int8),  # 0.6 MB
              "bias": rng.normal(size=(768,)).astype(np.float32)}
    arrays = {name: jnp.asarray(value) for name, value in values.items()}
    arrays["bias"] = jax.device_put(arrays["bias"], jax.devices()[0])  # committed to its device
    moved = host_memory.on_huge_pages({**arrays, "again": [arrays["int8"]], "not an array": 3})
    assert moved["again"][0] is moved["int8"] and moved["not an array"] == 3
    for name, value in values.items():
        assert moved[name] is not arrays[name] and moved[name].dtype == value.dtype
        assert moved[name].committed == arrays[name].committed  # else compiled programs would compile again
        np.testing.assert_array_equal(np.asarray(moved[name]), value)
        assert huge_page_kib_at(moved[name].unsafe_buffer_pointer()) >= 2048, name


def test_the_generator_moves_its_weights(monkeypatch):
    moved = []
    monkeypatch.setattr(host_memory, "on_huge_pages", lambda tree: moved.append(tree) or tree)
    generator = Generator(GPT(tiny_config().model, rngs=nnx.Rngs(0)))
    assert moved == [(generator.state, generator.layers)]


def test_opting_out_leaves_the_arrays_alone(monkeypatch):
    monkeypatch.setenv("CGPT_HOST_MALLOC", "default")
    array = jnp.ones((1 << 22,))
    assert host_memory.on_huge_pages({"weight": array})["weight"] is array
