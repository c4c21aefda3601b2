"""The train state, created already sharded: eval_shape → shardings from logical axes → jit(out_shardings)."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cgpt_jax.model import GPT
from cgpt_jax.parallel.sharding import check_replication, state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def model_graphdef(model_cfg: ml_collections.ConfigDict) -> nnx.GraphDef:
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return graphdef


def create_sharded_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
    """Initialise params and optimizer state directly into their shards; returns (state, shardings)."""

    def init() -> TrainState:
        model = GPT(config.model, rngs=nnx.Rngs(params=config.train.seed))
        params = nnx.state(model, nnx.Param)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    abstract = jax.eval_shape(init)
    shardings = state_shardings(abstract, mesh, config.mesh.rules)
    check_replication(abstract.params, shardings.params, mesh, config.mesh.max_replicated_fraction)
    state = jax.jit(init, out_shardings=shardings)()
    return state, shardings
