"""The train step (with gradient accumulation) and the eval step of an objective, jitted with explicit shardings."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cgpt_jax.parallel.sharding import activation_sharding
from cgpt_jax.train.objective import Batch, Objective
from cgpt_jax.train.state import TrainState

Metrics = dict[str, jax.Array]
BatchShardings = dict[str, jax.sharding.NamedSharding]


def _split_micro_batches(batch: Batch, n: int) -> Batch:
    """[B, ...] → [n, B/n, ...] taking rows k, k+n, k+2n, ... for micro-batch k, so that every device's
    contiguous block of rows holds an equal share of each micro-batch (no data movement)."""
    def split(x):
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def loss_and_grads(objective: Objective, graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
                   micro_batches: int) -> tuple[jax.Array, nnx.State]:
    grad_fn = jax.value_and_grad(lambda p, b: objective.loss(nnx.merge(graphdef, p), b))
    if micro_batches == 1:
        return grad_fn(params, batch)

    def accumulate(carry, micro_batch):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, micro_batch)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                           _split_micro_batches(batch, micro_batches))
    # Equal-sized micro-batches: the mean of their means is the full-batch mean.
    return loss_sum / micro_batches, jax.tree.map(lambda g: g / micro_batches, grad_sum)


def make_train_step(config: ml_collections.ConfigDict, objective: Objective, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: jax.sharding.Mesh,
                    state_shardings: Any, batch_shardings: BatchShardings, *,
                    compiler_options: dict[str, Any] | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    rules = config.mesh.rules
    micro_batches = config.train.micro_batches

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with activation_sharding(mesh, rules):
            loss, grads = loss_and_grads(objective, graphdef, state.params, batch, micro_batches)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                   compiler_options=compiler_options)


def make_eval_step(config: ml_collections.ConfigDict, objective: Objective, graphdef: nnx.GraphDef,
                   mesh: jax.sharding.Mesh, params_shardings: Any, batch_shardings: BatchShardings, *,
                   compiler_options: dict[str, Any] | None = None) -> Callable[[nnx.State, Batch], jax.Array]:
    def eval_step(params: nnx.State, batch: Batch) -> jax.Array:
        with activation_sharding(mesh, config.mesh.rules):
            return objective.loss(nnx.merge(graphdef, params), batch)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(eval_step, in_shardings=(params_shardings, batch_shardings), out_shardings=replicated, compiler_options=compiler_options)
