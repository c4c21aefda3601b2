"""Cerebras-GPT-muP checkpoints in HF format (model_type 'btlm' with mup_* fields): import with the right
multipliers, export back, and refuse what our muP does not compute.

transformers has no BTLM class offline (Cerebras ships it as remote code), so the reference is
transformers' GPT2LMHeadModel with BTLM's three changes written into its weights, which are exact
identities: the embedding multiplier scales wte and wpe (and, tied, the head: undone on the logits),
1/d_head attention scales the query columns of c_attn by 1/sqrt(d_head), and the logits are multiplied
by mup_width_scale.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax.config import resolve
from cgpt_jax.interop import hf
from cgpt_jax.model import GPT
from tests.helpers import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_interop_hf import random_hf_model  # noqa: E402  (after the importorskips)

D_MODEL, N_HEAD, N_LAYER, VOCAB, POSITIONS = 48, 4, 2, 97, 32
WIDTH_SCALE, EMBEDDINGS_SCALE = 0.25, 10.0  # base width 12: logits x 0.25
TOLERANCE = 1e-4
MUP_FIELDS = {"model_type": "btlm", "architectures": ["BTLMLMHeadModel"], "position_embedding_type": "learned",
              "mup_width_scale": WIDTH_SCALE, "mup_embeddings_scale": EMBEDDINGS_SCALE, "mup_output_alpha": 1.0,
              "mup_scale_qk_dot_by_d": True}


def random_gpt2(seed: int = 0):
    return random_hf_model((D_MODEL, N_HEAD, N_LAYER, VOCAB, POSITIONS, 4 * D_MODEL), seed)


def as_btlm(directory: pathlib.Path, **fields) -> None:
    """Rewrite a saved GPT-2 directory's config.json as a BTLM one (the tensors are named alike)."""
    config = json.loads((directory / hf.CONFIG_FILE).read_text())
    config.update(fields)
    (directory / hf.CONFIG_FILE).write_text(json.dumps(config))


def btlm_reference_logits(model, tokens_BxL: np.ndarray) -> np.ndarray:
    """BTLM's forward pass on GPT-2's weights, through transformers' GPT2LMHeadModel."""
    d_head = D_MODEL // N_HEAD
    reference = random_gpt2()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.transformer.wte.weight.mul_(EMBEDDINGS_SCALE)  # the tied head is scaled with it
        reference.transformer.wpe.weight.mul_(EMBEDDINGS_SCALE)
        for block in reference.transformer.h:
            block.attn.c_attn.weight[:, :D_MODEL].mul_(d_head ** -0.5)
            block.attn.c_attn.bias[:D_MODEL].mul_(d_head ** -0.5)
        logits = reference(torch.tensor(tokens_BxL)).logits.numpy()
    return logits * WIDTH_SCALE / EMBEDDINGS_SCALE


def our_logits(model: GPT, tokens_BxL: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens_BxL, jnp.int32)))[..., :model.cfg.vocab_size]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[pathlib.Path, object]:
    model = random_gpt2()
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path, model


def test_btlm_mup_checkpoint_imports_with_its_multipliers(saved, tmp_path):
    path, model = saved
    shutil.copytree(path, tmp_path / "mup")
    as_btlm(tmp_path / "mup", **MUP_FIELDS)
    pretrained = hf.from_pretrained(tmp_path / "mup")
    m = pretrained.config.model
    assert (m.parameterization, m.mup_base_d_model, m.mup_base_d_ff, m.mup_embedding_multiplier) == \
        ("mup", 12, 48, EMBEDDINGS_SCALE)
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, POSITIONS))
    expected = btlm_reference_logits(model, tokens)
    assert np.abs(our_logits(pretrained.model, tokens) - expected).max() <= TOLERANCE
    # Without the multipliers the logits are GPT-2's: the check above is not vacuous.
    with torch.no_grad():
        plain = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(plain - expected).max() > 100 * TOLERANCE


def test_btlm_without_mup_fields_is_plain_gpt2(saved, tmp_path):
    path, model = saved
    shutil.copytree(path, tmp_path / "sp")
    as_btlm(tmp_path / "sp", model_type="btlm", architectures=["BTLMLMHeadModel"])
    pretrained = hf.from_pretrained(tmp_path / "sp")
    assert pretrained.config.model.parameterization == "sp"
    tokens = np.random.RandomState(1).randint(0, VOCAB, (2, POSITIONS))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(our_logits(pretrained.model, tokens) - expected).max() <= TOLERANCE


def test_mup_export_round_trip_is_exact(tmp_path):
    config = tiny_config()
    m = config.model
    m.parameterization, m.mup_base_d_model, m.mup_base_d_ff = "mup", 8, 16  # m = 32/8 = 64/16 = 4
    model = GPT(resolve(config).model, rngs=nnx.Rngs(0))
    hf.save_pretrained(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / hf.CONFIG_FILE).read_text())
    assert {k: written[k] for k in MUP_FIELDS} == MUP_FIELDS
    back = hf.from_pretrained(tmp_path / "out")
    assert (back.config.model.mup_base_d_model, back.config.model.mup_base_d_ff) == (8, 16)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, m.vocab_size)
    np.testing.assert_array_equal(np.asarray(back.model(tokens)), np.asarray(model(tokens)))

    m.mup_base_d_ff = 32  # m_ff = 2 != m = 4: BTLM has one width scale
    with pytest.raises(hf.HFCheckpointError, match="mup_base_d_ff = 2 differs from"):
        hf.save_pretrained(nnx.eval_shape(lambda: GPT(resolve(config).model, rngs=nnx.Rngs(0))), tmp_path / "x")


BAD_BTLM = {
    "output_alpha": ({"mup_output_alpha": 2.0}, "mup_output_alpha=2.0"),
    "alibi": ({"position_embedding_type": "alibi"}, "position_embedding_type='alibi'"),
    "swiglu": ({"activation_function": "swiglu"}, "activation_function='swiglu'"),
    "sqrt_attention": ({"mup_scale_qk_dot_by_d": False}, "mup_scale_qk_dot_by_d=false"),
    "fractional_base": ({"mup_width_scale": 0.3}, "n_embd=48 times mup_width_scale=0.3 is not a whole base width"),
    "negative_scale": ({"mup_embeddings_scale": -1.0}, "mup_embeddings_scale=-1.0 must be a positive number"),
    "architecture": ({"architectures": ["GPT2LMHeadModel"]}, r"expected one of \['BTLMLMHeadModel'"),
}


@pytest.mark.parametrize("case", list(BAD_BTLM))
def test_btlm_configs_we_cannot_compute_are_refused(case, saved, tmp_path):
    path, _ = saved
    shutil.copytree(path, tmp_path / "m")
    change, message = BAD_BTLM[case]
    as_btlm(tmp_path / "m", **{**MUP_FIELDS, **change})
    with pytest.raises(hf.HFCheckpointError, match=message):
        hf.from_pretrained(tmp_path / "m")
