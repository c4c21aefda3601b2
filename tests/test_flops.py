"""The one FLOP count reproduces the seven published Cerebras-GPT training-FLOP totals to 2 s.f."""
import pytest

from cgpt_jax import flops, reference
from cgpt_jax.config import resolve
from experiments import cerebras_gpt

REFERENCE = reference.load()
SIZES = {"111m": "111M", "256m": "256M", "590m": "590M", "1.3b": "1.3B", "2.7b": "2.7B", "6.7b": "6.7B",
         "13b": "13B"}


def _two_sig_figs(x: float) -> float:
    return float(f"{x:.1e}")


@pytest.mark.parametrize("size", list(SIZES))
def test_cerebras_convention_matches_published_totals(size):
    published = REFERENCE["models"][SIZES[size]]
    config = resolve(cerebras_gpt.get_config(f"size={size}"))
    shape = flops.Shape.from_model_config(config.model, config.train.seq_len)
    total = flops.training_flops(shape, published["training_tokens"], "cerebras")
    assert _two_sig_figs(total) == published["training_flops_reported"]


def test_6n_convention_matches_derived_6nd():
    published = REFERENCE["models"]["111M"]
    config = resolve(cerebras_gpt.get_config("size=111m"))
    shape = flops.Shape.from_model_config(config.model, 2048)
    assert flops.training_flops(shape, published["training_tokens"], "6n") == pytest.approx(
        published["six_N_D_flops_DERIVED"], rel=1e-12)


def test_palm_convention_and_mfu():
    config = resolve(cerebras_gpt.get_config("size=111m"))
    shape = flops.Shape.from_model_config(config.model, 2048)
    d, L, V, S = 768, 10, 50257, 2048
    expected = 6 * (L * 12 * d * d + V * d) + 3 * L * 4 * S * d
    assert flops.flops_per_token(shape, "palm") == expected
    assert flops.mfu(1000.0, shape, 1e12) == pytest.approx(1000.0 * expected / 1e12)
    with pytest.raises(ValueError, match="unknown FLOP convention"):
        flops.flops_per_token(shape, "chinchilla")
