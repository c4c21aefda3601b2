"""Finished run directories written directly (no training), for the analysis tests of a whole sweep."""
import json
from pathlib import Path


def write_run(workdir: Path, name: str, *, n_params: float, tokens: float, flops: float, loss: float,
              experiment: str, model: dict | None = None, train: dict | None = None) -> Path:
    """A finished run as the trainer leaves it: sweep_run.json, config.json, metrics.jsonl, summary.json."""
    run = workdir / name
    run.mkdir(parents=True)
    config = {"data": {"source": "stdlib"}, "model": {"vocab_size": 512, **(model or {})}, "train": train or {}}
    (run / "sweep_run.json").write_text(json.dumps({"experiment": experiment, "name": name, "config_arg": None,
                                                    "overrides": {}, "config": config}))
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 10.0}) + "\n"
                                       + json.dumps({"step": 9, "loss": loss, "eval_loss": loss}) + "\n")
    (run / "summary.json").write_text(json.dumps({
        "status": "finished", "step": 9, "final_eval_loss": loss, "final_train_loss": loss, "n_params": n_params,
        "n_params_non_embedding": 0.7 * n_params, "tokens": tokens, "flops_cerebras": flops, "flops_palm": flops,
        "flops_6n": flops, "wall_time_s": 1.0, "tokens_per_sec": 1.0}))
    return run
