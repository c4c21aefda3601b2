"""The train state: step, parameters and optimizer state (created already sharded by
`cgpt_jax/train/setup.py:build_run`)."""
from __future__ import annotations

import flax.struct
import jax
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
