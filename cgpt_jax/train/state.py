"""The train state (step, parameters, optimizer state) and the model's graph definition.

The state is created already sharded by `cgpt_jax/train/setup.py:build_run`."""
from __future__ import annotations

import flax.struct
import jax
import ml_collections
import optax
from flax import nnx

from cgpt_jax.model import GPT


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def model_graphdef(model_cfg: ml_collections.ConfigDict) -> nnx.GraphDef:
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return graphdef
