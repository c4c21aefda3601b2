"""KV-cache decoding and sampling: `Generator` (prefill + single-token decode) and `Sampling`."""
from cgpt_jax.infer.generator import Generator
from cgpt_jax.infer.sampling import Sampling

__all__ = ["Generator", "Sampling"]
