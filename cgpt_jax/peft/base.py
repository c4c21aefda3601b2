"""The contract every parameter-efficient fine-tuning method fulfils.

A method is a `Method` subclass registered under a name (see `__init__.py`). It says three things:

    trains_base                 whether the backbone's own parameters train (`full`) or stay frozen
    make(model_cfg, rngs)       the parameters it adds, an `Added` module (or None), which the model keeps
                                as `model.peft` (path 'peft/<name>/...') and applies in every forward
                                pass, training and KV-cache decoding alike (`GPT.active_blocks`)
    validate(model_cfg, **options)   ValueError at config time when it cannot serve the model
    virtual_tokens(**options)   the positions it puts before every sequence (0: none; see below)

and declares `options` (its config-string arguments with defaults), `slots` (the places of the model it
changes: two methods of one combination may not claim the same slot), `mergeable` (its change can be
folded into the base weights, `Added.merge_into`) and `examples` (options that fit the conformance suite's
tiny model: d_model 32, 2 layers of 4 heads, d_ff 128).

What trains: the method's added parameters, the task head ('score') when the model has one, and the
backbone when `trains_base`. Everything else is frozen: the loss sees it through `jax.lax.stop_gradient`
(so no weight gradient is computed for it) and the optimizer holds no state for it (train/optimizer.py).
Added parameters declare logical axes (per-layer ones with a leading 'layers' axis, like the stacked
blocks) and a parameterization group, so they shard and train under the same rules as the weights they change.

The effect at initialisation, which the conformance suite checks:
* a method without virtual tokens (full, head_only, lora, adapter): none, the model computes the base's
  outputs exactly;
* a method with virtual tokens (prompt, prefix) puts n positions before every sequence, as HF PEFT does:
  they hold positions 0..n-1, a sequence's real token i sits at position n + i (so the input may have at
  most max_seq_len - n tokens), and their keys and values in every layer, `Added.virtual_cache(model)`,
  live in the KV cache's first n slots (cgpt_jax/model/gpt.py). They start as the base's own activations of
  the token ids `Added.virtual_ids`, so at init the model computes exactly what the base computes on those
  ids followed by the input, at the input's positions (up to float rounding: another order of operations).
  Heads and losses see real tokens only: a classifier pools each row's last real token as before.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import ml_collections
from flax import nnx

PEFT = "peft"  # the model attribute (and parameter path prefix) of the added parameters
HEAD = "score"  # a classifier's task head (cgpt_jax/finetune/model.py), trained by every method


class Added(nnx.Module):
    """A method's added parameters and how the forward pass uses them."""

    # Token ids whose base activations the virtual tokens start from; their number is the virtual tokens'.
    virtual_ids: tuple[int, ...] = ()

    @property
    def virtual_tokens(self) -> int:
        return len(self.virtual_ids)

    def virtual_cache(self, model: nnx.Module) -> dict[str, jax.Array] | None:
        """The virtual tokens' keys and values: the model's stacked cache arrays for batch 1 and
        `virtual_tokens` slots ([layers, 1, ...], as `model.encode_virtual` returns them); None without."""
        return None

    def adapt_blocks(self, blocks: nnx.Module) -> nnx.Module:
        """The stacked blocks the forward pass runs (a weight change returns a changed copy)."""
        return blocks

    def merge_into(self, blocks: nnx.Module) -> nnx.Module:
        """The blocks with this change folded into their weights (mergeable methods only)."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")


class Method:
    """Interface of a PEFT method (a subclass is selected by name in config.finetune.method)."""

    options: ClassVar[dict[str, Any]] = {}
    slots: ClassVar[tuple[str, ...]] = ()
    trains_base: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def __init__(self, **options: Any):
        self.opts = options

    @classmethod
    def validate(cls, model_cfg: ml_collections.ConfigDict, **options: Any) -> None:
        """Raise ValueError naming the option and the fix when the method cannot serve `model_cfg`."""

    @classmethod
    def virtual_tokens(cls, **options: Any) -> int:
        """Positions the method puts before every sequence (prompt, prefix); 0 for most methods."""
        return 0

    def make(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Added | None:
        return None
