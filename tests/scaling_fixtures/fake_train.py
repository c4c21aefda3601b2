"""A stand-in for `python -m cgpt_jax.train` in the runner tests: same flags, no JAX.

It parses --config like the real trainer (absl config_flags), counts its invocations in calls.txt, and
behaves as config.fake.outcome says; finished runs get a loss from a known law of their compute. Its workdir
may be a bucket, like the real trainer's (cgpt_jax.storage).
"""
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from cgpt_jax import storage

_CONFIG = config_flags.DEFINE_config_file("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory")


def main(argv):
    cfg, workdir = _CONFIG.value, storage.path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    calls = workdir / "calls.txt"
    calls.write_text((calls.read_text() if calls.exists() else "") + "call\n")
    (workdir / "config.json").write_text(cfg.to_json())
    outcome = cfg.fake.outcome
    if outcome == "crash":
        print("boom: the fake trainer crashed on purpose", file=sys.stderr)
        sys.exit(3)
    checkpoint = workdir / "checkpoint.txt"
    resumed = checkpoint.exists()
    if outcome == "interrupt_once" and not resumed:
        checkpoint.write_text("step 5")
        print("killed at step 5", file=sys.stderr)
        sys.exit(137)
    if outcome == "no_summary":
        return
    d, layers = cfg.model.d_model, cfg.model.n_layers
    n = 12 * d * d * layers
    tokens = cfg.train.tokens_per_param * n
    flops = 6.0 * n * tokens
    loss = (flops / 1e3) ** -0.1 + 1.0
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n" +
                                           json.dumps({"step": 10, "loss": loss, "eval_loss": loss}) + "\n")
    summary = {"status": "finished", "step": 10, "final_eval_loss": loss, "final_train_loss": loss,
               "n_params": n + 64 * d, "n_params_non_embedding": n, "tokens": tokens, "flops_cerebras": flops,
               "flops_palm": flops, "flops_6n": flops, "wall_time_s": 0.1, "tokens_per_sec": 1.0,
               "resumed": resumed, "fake_config": cfg.fake.to_dict()}
    (workdir / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
