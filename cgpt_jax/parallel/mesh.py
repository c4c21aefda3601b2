"""Build the (data, fsdp, tensor) device mesh from the config."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import ml_collections

from cgpt_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """Resolve the sizes in `config.mesh` (one of them may be -1, meaning "all remaining devices")."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    wildcards = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad:
        raise InputError(f"{', '.join(bad)}: mesh axis sizes must be positive, or -1 for 'the rest'.")
    if len(wildcards) > 1:
        raise InputError(f"mesh axes {wildcards} are all -1; at most one axis may take 'the rest' of the "
                         f"devices. Set the others explicitly, e.g. --config.mesh.{wildcards[1]}=1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if wildcards:
        if n_devices % fixed:
            raise InputError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {fixed}, which "
                             f"does not divide the {n_devices} available devices.")
        sizes[MESH_AXES.index(wildcards[0])] = n_devices // fixed
    elif fixed != n_devices:
        raise InputError(f"mesh {dict(zip(MESH_AXES, sizes))} has {fixed} devices but {n_devices} are "
                         f"available; make the product equal {n_devices} or set one axis to -1.")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)
