"""Hand-written kernels for what XLA compiles poorly on a platform, each with a pure-JAX equivalent
that the tests compare it against."""
