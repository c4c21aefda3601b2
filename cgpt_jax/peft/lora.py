"""`lora(rank=8, alpha=16, targets='qkv|out|up|down')`: low-rank updates of the named kernels (Hu et al.,
2021). Each target kernel W [in, out] of every layer runs as W + (alpha/rank)·A·B with A [in, rank] drawn
as HF PEFT draws it (kaiming-uniform, bound 1/√in) and B [rank, out] zero, so the model starts as the base.

Targets: 'qkv' (the attention's Q/K/V kernel, GPT-2's attn.c_attn), 'out' (attn.c_proj), 'up' (mlp.c_fc),
'down' (mlp.c_proj). A and B keep the kernel's own input and output axes (A [layers, *in, rank], B
[layers, rank, *out]), so they shard like it.

The update is applied to the weights, not to the activations: one [in, rank]·[rank, out] product per
kernel and step, negligible next to the activations' matmuls, and the forward pass is the base's own, so
training, KV-cache decoding and every attention core see it unchanged. For the same reason there is no
LoRA dropout (it would act on the branch's input activations); `merge` folds the update in for good.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax.model import parameterization
from cgpt_jax.peft import register
from cgpt_jax.peft.base import Added, Method

# target → (module in a block, kernel, number of leading input axes)
TARGETS: dict[str, tuple[str, str, int]] = {
    "qkv": ("attn", "qkv_kernel", 1),
    "out": ("attn", "out_kernel", 2),
    "up": ("mlp", "up_kernel", 1),
    "down": ("mlp", "down_kernel", 1),
}


def parse_targets(targets: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in targets.split("|"))
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"targets={targets!r}: {unknown} match no kernel; the targets are {list(TARGETS)}, "
                         f"joined by '|' (e.g. targets='qkv|out')")
    if len(set(names)) != len(names):
        raise ValueError(f"targets={targets!r} names a kernel twice; name each once")
    return names


def _abstract_kernels(model_cfg: ml_collections.ConfigDict) -> dict[str, nnx.Param]:
    """The targeted kernels of one block, shapes only (their names depend on the attention variant)."""
    from cgpt_jax.model.gpt import Block

    block = nnx.eval_shape(lambda: Block(model_cfg, rngs=nnx.Rngs(0)))
    found = {}
    for target, (module, kernel, _) in TARGETS.items():
        param = getattr(getattr(block, module), kernel, None)
        if isinstance(param, nnx.Param):
            found[target] = param
    return found


def _matrix_shape(param: nnx.Param, n_in: int) -> tuple[int, int]:
    return math.prod(param.shape[:n_in]), math.prod(param.shape[n_in:])


class LoRAWeights(Added):
    def __init__(self, model_cfg: ml_collections.ConfigDict, rank: int, alpha: float, targets: tuple[str, ...],
                 rngs: nnx.Rngs):
        self.scale = alpha / rank
        self.targets = targets
        kernels = _abstract_kernels(model_cfg)
        n_layers = model_cfg.n_layers
        for target in targets:
            param, n_in = kernels[target], TARGETS[target][2]
            axes = param.get_metadata()["logical_axes"]
            group = param.get_metadata()[parameterization.GROUP_KEY]
            in_shape, out_shape = param.shape[:n_in], param.shape[n_in:]
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            a = jax.random.uniform(rngs.params(), (n_layers, *in_shape, rank), jnp.float32, -bound, bound)
            dtype = jnp.dtype(model_cfg.param_dtype)
            setattr(self, f"{target}_a", nnx.Param(a.astype(dtype), logical_axes=("layers", *axes[:n_in], None),
                                                   **{parameterization.GROUP_KEY: group,
                                                      parameterization.INIT_KEY: "module"}))
            setattr(self, f"{target}_b", nnx.Param(jnp.zeros((n_layers, rank, *out_shape), dtype),
                                                   logical_axes=("layers", None, *axes[n_in:]),
                                                   **{parameterization.GROUP_KEY: group,
                                                      parameterization.INIT_KEY: "zeros"}))

    def delta(self, target: str) -> jax.Array:
        """(alpha/rank)·A·B for every layer, in the kernel's shape [layers, *in, *out]."""
        a, b = getattr(self, f"{target}_a")[...], getattr(self, f"{target}_b")[...]
        layers, rank = a.shape[0], a.shape[-1]
        a_LxIxR = a.reshape(layers, -1, rank)
        b_LxRxO = b.reshape(layers, rank, -1)
        delta_LxIxO = jnp.einsum("lir,lro->lio", a_LxIxR, b_LxRxO, preferred_element_type=jnp.float32)
        return (self.scale * delta_LxIxO).reshape(*a.shape[:-1], *b.shape[2:])

    def merge_into(self, blocks: nnx.Module) -> nnx.Module:
        # A new state: the blocks' own Variables are shared with the model and must not change.
        graphdef, state = nnx.split(blocks)
        targets = {(TARGETS[t][0], TARGETS[t][1]): t for t in self.targets}
        flat = []
        for path, param in nnx.to_flat_state(state):
            target = targets.get(tuple(str(p) for p in path))
            if target is not None:
                w = param[...]
                param = param.replace((w.astype(jnp.float32) + self.delta(target)).astype(w.dtype))
            flat.append((path, param))
        return nnx.merge(graphdef, nnx.from_flat_state(flat))

    adapt_blocks = merge_into  # applied on the fly, inside the traced forward pass


@register("lora")
class LoRA(Method):
    options: ClassVar[dict[str, Any]] = {"rank": 8, "alpha": 16, "targets": "qkv|out|up|down"}
    slots: ClassVar[tuple[str, ...]] = ("kernels",)
    mergeable: ClassVar[bool] = True
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({"rank": 4, "alpha": 8},)

    @classmethod
    def validate(cls, model_cfg: ml_collections.ConfigDict, **options: Any) -> None:
        rank, alpha = options["rank"], options["alpha"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"rank={rank!r} must be a positive integer, e.g. rank=8")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise ValueError(f"alpha={alpha!r} must be a positive number, e.g. alpha=16")
        if not isinstance(options["targets"], str):
            raise ValueError(f"targets={options['targets']!r} must be a string such as 'qkv|out'")
        kernels = _abstract_kernels(model_cfg)
        for target in parse_targets(options["targets"]):
            if target not in kernels:
                raise ValueError(f"targets: {target!r} matches no parameter of attention "
                                 f"{model_cfg.attention!r} (its kernels: {sorted(kernels)}); leave it out")
            fan_in, fan_out = _matrix_shape(kernels[target], TARGETS[target][2])
            if rank > min(fan_in, fan_out):
                raise ValueError(f"rank={rank} is larger than the {target} kernel's smaller side "
                                 f"({fan_in}x{fan_out}); use a rank of at most {min(fan_in, fan_out)}")

    def make(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> LoRAWeights:
        return LoRAWeights(model_cfg, self.opts["rank"], self.opts["alpha"], parse_targets(self.opts["targets"]),
                           rngs)
