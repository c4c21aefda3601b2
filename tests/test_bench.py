"""The benchmark compares like with like: the PyTorch reference computes cgpt_jax's model and training step,
and the comparison CLI reports both frameworks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import optax
from flax import nnx

from cgpt_jax.bench import report
from cgpt_jax.bench.runners import random_tokens
from cgpt_jax.bench.torch_gpt import TorchTrainer
from cgpt_jax.config import resolve
from cgpt_jax.train.optimizer import make_optimizer
from cgpt_jax.train.objective import LANGUAGE_MODELING
from cgpt_jax.train.step import loss_and_grads
from tests.helpers import one_device_env, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _config():
    config = tiny_config()
    m, t = config.model, config.train
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 97, 32, 2, 4, 128, 16
    t.seq_len, t.global_batch_size, t.steps, t.warmup_steps, t.peak_lr = 16, 4, 10, 0, 1e-2
    return resolve(config)


def _copy_into_torch(params: dict, trainer: TorchTrainer) -> None:
    """cgpt_jax parameters → the reference's state dict (torch Linear weights are [out, in])."""
    p = jax.tree.map(np.asarray, params)
    d = p["wte"].shape[1]
    state = {"wte.weight": p["wte"], "wpe.weight": p["wpe"], "ln_f.weight": p["ln_f"]["scale"],
             "ln_f.bias": p["ln_f"]["bias"]}
    b = p["blocks"]
    for i in range(len(trainer.model.blocks)):
        state.update({
            f"blocks.{i}.ln_attn.weight": b["ln_attn"]["scale"][i], f"blocks.{i}.ln_attn.bias": b["ln_attn"]["bias"][i],
            f"blocks.{i}.qkv.weight": b["attn"]["qkv_kernel"][i].reshape(d, 3 * d).T,
            f"blocks.{i}.qkv.bias": b["attn"]["qkv_bias"][i].reshape(3 * d),
            f"blocks.{i}.attn_out.weight": b["attn"]["out_kernel"][i].reshape(d, d).T,
            f"blocks.{i}.attn_out.bias": b["attn"]["out_bias"][i],
            f"blocks.{i}.ln_mlp.weight": b["ln_mlp"]["scale"][i], f"blocks.{i}.ln_mlp.bias": b["ln_mlp"]["bias"][i],
            f"blocks.{i}.up.weight": b["mlp"]["up_kernel"][i].T, f"blocks.{i}.up.bias": b["mlp"]["up_bias"][i],
            f"blocks.{i}.down.weight": b["mlp"]["down_kernel"][i].T, f"blocks.{i}.down.bias": b["mlp"]["down_bias"][i],
        })
    trainer.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


def test_torch_reference_computes_the_same_training_step():
    """Same weights → same loss, and after one clipped AdamW step (decay on matrices only) the same weights."""
    config = _config()
    from cgpt_jax.model import GPT

    model = GPT(config.model, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = random_tokens(config, seed=1)
    trainer = TorchTrainer(config, torch.from_numpy(tokens.astype(np.int64)))
    _copy_into_torch(nnx.to_pure_dict(params), trainer)

    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    tx = make_optimizer(config.train, config.model)
    loss, grads = loss_and_grads(LANGUAGE_MODELING, graphdef, params, batch, 1)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = nnx.to_pure_dict(optax.apply_updates(params, updates))

    # The JAX schedule starts at peak_lr (no warmup); give torch's AdamW the same learning rate.
    torch_loss = trainer.step()
    np.testing.assert_allclose(torch_loss, float(loss), rtol=1e-6)
    expected = jax.tree.map(np.asarray, new_params)
    got = trainer.model.state_dict()
    np.testing.assert_allclose(got["wte.weight"].numpy(), expected["wte"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["blocks.1.down.weight"].numpy(), expected["blocks"]["mlp"]["down_kernel"][1].T,
                               rtol=1e-5, atol=1e-7)
    # The key bias is left out: softmax ignores a per-query shift, so its gradient is rounding noise, which
    # Adam's normalisation turns into updates of arbitrary sign in both frameworks.
    query_and_value_bias = got["blocks.0.qkv.bias"].numpy().reshape(3, -1)[[0, 2]]
    np.testing.assert_allclose(query_and_value_bias, expected["blocks"]["attn"]["qkv_bias"][0][[0, 2]].reshape(2, -1),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["ln_f.weight"].numpy(), expected["ln_f"]["scale"], rtol=1e-5, atol=1e-7)


def test_torch_reference_refuses_what_it_does_not_implement():
    config = _config()
    config.model.attention = "rope"
    with pytest.raises(ValueError, match="dense attention"):
        TorchTrainer(config, torch.zeros((4, 17), dtype=torch.int64))


def test_compare_cli_reports_both_frameworks(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = one_device_env()
    command = [sys.executable, "-m", "cgpt_jax.bench", "--config=experiments/cpu_bench.py:size=d16l2",
               "--compare=torch", "--rounds=2", "--steps=1", "--label=d16l2", f"--out={out}"]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["frameworks"]) == {"cgpt_jax", "pytorch_eager"}
    ours, theirs = result["frameworks"]["cgpt_jax"], result["frameworks"]["pytorch_eager"]
    assert ours["params"] == theirs["params"] == 16_832  # the ladder's d16l2 rung, in both frameworks
    for framework in (ours, theirs):
        assert framework["tokens_per_sec"] > 0 and len(framework["step_s_rounds"]) == 2
        assert framework["peak_memory_mib"] > 0
        assert set(framework["mfu"]) == {"theoretical", "measured"} and 0 < framework["mfu"]["measured"] < 1
    assert ours["compile_s"] > 0
    ratio = np.median([t / o for t, o in zip(theirs["step_s_rounds"], ours["step_s_rounds"])])
    assert result["ratio_tokens_per_sec"] == pytest.approx(ratio, abs=1e-3)
    text = report.table([result])
    assert text.splitlines()[2].startswith("| d16l2 | 16,832 |")
