"""Three micro models on the synthetic source: the end-to-end sweep test with the real trainer."""
import ml_collections

from cgpt_jax.config import base_config, parse_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, steps=40)
    c = base_config()
    m, t = c.model, c.train
    c.data.source = "synthetic"
    c.data.synthetic_vocab_size = 64
    c.data.eval_batches = 2
    m.d_model, m.n_layers, m.n_heads, m.d_ff = 16, 1, 2, 64
    m.max_seq_len = t.seq_len = 32
    t.global_batch_size, t.steps, t.warmup_steps, t.peak_lr = 8, args.steps, 4, 1e-2
    t.log_every, t.eval_every = 10, 1000  # evaluated once, at the last step
    return c


def sweep(arg=None) -> list[dict]:
    return [{"name": f"d{d}", "model.d_model": d, "model.d_ff": 4 * d, "model.n_layers": layers}
            for d, layers in ((16, 1), (32, 2), (64, 2))]
