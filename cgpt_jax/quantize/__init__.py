"""Weight-only post-training quantization for inference: int8 per output channel, int4 group-wise.

    scheme = quantize.parse("int4:group=32")        # or "int8", "int4" (group 32); InputError otherwise
    qmodel = quantize.apply(model, scheme)           # a copy with its weights quantized (GPT or classifier)
    quantize.save(directory, qmodel, scheme, source=...)   # an Orbax checkpoint + quantized.json
    loaded = quantize.load(directory, scheme=None, mesh=None)   # never materialises float32 weights

A quantized model is the same nnx module with each weight's value replaced by a `QuantizedArray`
(integers + float32 scales, `array.py`); which weights, and along which axes, is `model.py`. The model
code reads a parameter as `param[...]`, which dequantizes it, and its projections and tied head multiply
through `QuantizedArray.matmul_rows` (`matmul.py`: on CPU a C++ kernel reads the integers once for the
few rows of a decode step), so the forward pass, the KV-cache `Generator`, the evaluation scorer and the
classifier run it unchanged; the weights and scales shard by
the weight's logical axes (`cgpt_jax.parallel.sharding.state_shardings`). `python -m cgpt_jax.quantize`
writes a quantized checkpoint (of a language model or of a fine-tuned classifier); `generate`, `classify`
and the evaluation harness take `--quantize` / `quantize=` and quantized checkpoint directories. Inference only: nothing trains a quantized model.

Why not qwix's model-level PTQ (`qwix.quantize_model` with `PtqProvider`): on this model it fails (the
tied LM head's quantized replacement of `wte` breaks the embedding lookup, `jnp.take` of a `WithAux`), it
finds weights by inspecting stack frames and tracers, which does not reach the layers stacked by
`nnx.vmap` and sliced per layer, and it sees `jnp.dot`/`einsum` but not the `@` of `layers.matmul_rows`.
The numerics (symmetric absmax, per-channel or tiled scales) are the same as `qwix.quantize`'s.
"""
from cgpt_jax.quantize.array import QuantizedArray, dequantize
from cgpt_jax.quantize.checkpoint import ClassifierHead, Loaded, is_checkpoint, load, save
from cgpt_jax.quantize.model import apply, check, quantize_state, weight_bytes
from cgpt_jax.quantize.scheme import Scheme, parse

__all__ = ["ClassifierHead", "Loaded", "QuantizedArray", "Scheme", "apply", "check", "dequantize", "is_checkpoint", "load", "parse",
           "quantize_state", "save", "weight_bytes"]
