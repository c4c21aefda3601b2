"""The coordinate check (cgpt_jax/mup_check.py) on a CPU-small configuration: after a few Adam steps every
layer type's activation size is flat in width under muP (|log-log slope| < 0.1) and grows under SP."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import mup_check
from cgpt_jax.model import GPT
from tests.test_attention_conformance import randomized

WIDTHS = [64, 256, 1024]  # one layer, 32 tokens: each width compiles one small train step


def test_layer_outputs_follow_the_model_forward_pass():
    config = mup_check.check_config(64, "mup", base_width=32, n_layers=2)
    model = randomized(lambda: GPT(config.model, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    outputs = mup_check.layer_outputs(model, tokens)
    np.testing.assert_allclose(np.asarray(outputs["logits"]), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)
    assert outputs["attn_logits"].shape == (2, 2, 4, 16, 16)  # layers, batch, heads, queries, keys
    assert set(outputs) == set(mup_check.LAYER_TYPES)


def test_mup_is_flat_in_width_and_sp_grows(tmp_path):
    results = mup_check.coord_check(WIDTHS, steps=4, n_layers=1)
    mup_flat, sp_grows, report = mup_check.verdict(results)
    print(report)
    assert mup_flat and sp_grows, report
    # At initialisation the activations (not the changes) are flat under muP too, and the slope fit is sane.
    assert all(abs(s[0]) < 0.1 for layer, s in results["mup"]["slopes"].items()
               if layer not in mup_check.CHANGE_LAYERS)
    assert mup_check.fit_slope([1, 2, 4], [3.0, 6.0, 12.0]) == pytest.approx(1.0)
    mup_check.plot(results, WIDTHS, tmp_path / "coord_check.png")
    assert (tmp_path / "coord_check.png").stat().st_size > 10_000
