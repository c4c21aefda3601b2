"""The one place a run is set up: mesh → input sharding → optimizer (with its guard) → sharded state → steps.

The training loop, the planner, the benchmark, the muP coordinate check and the tests all call
`build_run`, so what is planned and measured is the step that trains. What is trained (model, batch,
loss) is the `objective`: language modelling for pretraining, another `Objective` for fine-tuning.

    run = build_run(config, make_mesh(config.mesh, devices))
    state = run.init_state()                      # params and optimizer state, created in their shards
    state, metrics = run.train_step(state, batch)  # jitted, donates `state`
    loss = run.eval_step(state.params, batch)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cgpt_jax import peft
from cgpt_jax.config import validate
from cgpt_jax.parallel.sharding import check_replication, logical_to_spec, state_shardings
from cgpt_jax.peft import training as peft_training
from cgpt_jax.train.faults import reject_nonfinite
from cgpt_jax.train.objective import LANGUAGE_MODELING, Batch, Objective
from cgpt_jax.train.optimizer import lr_schedule, make_optimizer
from cgpt_jax.train.state import TrainState
from cgpt_jax.train.step import BatchShardings, Metrics, make_eval_step, make_train_step


# For programs compiled many times and run for a few steps (the muP coordinate check, the conformance
# suite's training check): XLA's backend optimisations cost more compile time than they save there.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> jax.sharding.NamedSharding:
    """How a [batch, length] array of token ids is laid out on `mesh`."""
    return jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run computes with; nothing in it is allocated until `init_state` is called."""

    config: ml_collections.ConfigDict  # resolved and validated against the mesh
    objective: Objective
    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.NamedSharding  # of token arrays, [batch, length]
    batch_shardings: BatchShardings  # of each array of the objective's batch
    tx: optax.GradientTransformation  # the recipe, wrapped so that a non-finite gradient changes nothing
    schedule: optax.Schedule
    graphdef: nnx.GraphDef
    abstract_state: TrainState  # shapes and dtypes of step, params and optimizer state
    shardings: Any  # a TrainState of NamedShardings, from the logical-axis rules
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]  # jitted; donates the state
    eval_step: Callable[[nnx.State, Batch], jax.Array]  # jitted; mean cross-entropy of a batch
    _init: Callable[[], TrainState]

    def init_state(self) -> TrainState:
        """Parameters from config.train.seed and a fresh optimizer state, initialised into their shards."""
        return jax.jit(self._init, out_shardings=self.shardings)()

    def abstract_batch(self) -> Batch:
        """The shapes of one global batch (for lowering the steps without data)."""
        return {name: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=self.batch_shardings[name])
                for name, array in self.objective.batch_layout(self.config).items()}

    def place_batch(self, tokens_BxL1: np.ndarray) -> Batch:
        """[global_batch, seq_len + 1] token ids → inputs [:, :-1] and targets [:, 1:], sharded."""
        return {"inputs": jax.device_put(tokens_BxL1[:, :-1], self.batch_sharding),
                "targets": jax.device_put(tokens_BxL1[:, 1:], self.batch_sharding)}


def build_run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
              objective: Objective = LANGUAGE_MODELING, compiler_options: dict[str, Any] | None = None) -> Run:
    """Set up a run of the resolved `config` on `mesh` (see the module docstring).

    `compiler_options` go to XLA for both steps (e.g. `FAST_COMPILE`); the default is what training uses.
    """
    validate(config, mesh.size)
    t = config.train
    schedule = lr_schedule(t)
    # A PEFT method (config.finetune.method; 'full' changes nothing): its parameters join the model, the
    # loss sees the frozen ones as constants and the optimizer holds state only for the trainable ones.
    recipe = peft.build(config.finetune.method)
    objective = peft_training.with_method(objective, recipe, config)
    trainable = None if recipe.trains_base else functools.partial(peft_training.trainable_mask, recipe)
    tx = reject_nonfinite(make_optimizer(t, config.model, trainable))

    def init() -> TrainState:
        params = nnx.state(objective.make_model(config, nnx.Rngs(params=t.seed)), nnx.Param)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    abstract_state = jax.eval_shape(init)
    shardings = state_shardings(abstract_state, mesh, config.mesh.rules)
    check_replication(abstract_state.params, shardings.params, mesh, config.mesh.max_replicated_fraction)
    batch_shardings = {name: array.sharding(mesh, config.mesh.rules)
                       for name, array in objective.batch_layout(config).items()}
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: objective.make_model(config, nnx.Rngs(0))), nnx.Param)
    return Run(
        config=config, objective=objective, mesh=mesh, batch_sharding=batch_sharding(mesh, config.mesh.rules),
        batch_shardings=batch_shardings, tx=tx, schedule=schedule, graphdef=graphdef,
        abstract_state=abstract_state, shardings=shardings,
        train_step=make_train_step(config, objective, graphdef, tx, schedule, mesh, shardings, batch_shardings,
                                   compiler_options=compiler_options),
        eval_step=make_eval_step(config, objective, graphdef, mesh, shardings.params, batch_shardings,
                                 compiler_options=compiler_options),
        _init=init)
