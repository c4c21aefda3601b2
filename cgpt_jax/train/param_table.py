"""The per-parameter table a run logs and saves at start-up (DIR/param_table.json), so that the
parameterization can be audited: each parameter's group, init, learning rate and forward multipliers.

    {"parameterization": "mup", "width_multiplier": 3.0, "ff_width_multiplier": 3.0,
     "embedding_multiplier": 10.0, "output_logits_multiplier": 0.333, "attention_scale": 0.0156,
     "peak_lr": 0.006, "weight_decay": 0.1,
     "params": [{"param": "blocks/attn/qkv_kernel", "group": "attn_input", "shape": [10, 768, 3, 12, 64],
                 "init": "trunc_normal", "init_std": 0.0462, "lr_multiplier": 0.333, "peak_lr": 0.002,
                 "weight_decay": 0.1, "forward": {"attention_logits": 0.0156}}, ...]}

Every column comes from the parameter's declaration (its group; cgpt_jax/model/parameterization.py).
`init` is 'trunc_normal' (±2 std, `init_std`), 'ones' or 'zeros', or 'module' for a parameter its module
initialises in its own way (`init_std` null but for 'trunc_normal'; cgpt_jax/model/layers.py's helpers
record it); `weight_decay` is the
decoupled coefficient, applied times the parameter's own learning rate; `forward` names what the parameter's
output is multiplied by: 'embedding_output' (the token + position sum), 'output_logits' (the tied LM head),
'attention_logits' (q·k).
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from cgpt_jax.model import parameterization
from cgpt_jax.train.objective import LANGUAGE_MODELING, Objective

PARAM_TABLE = "param_table.json"


def _init(group: str, param: nnx.Variable, model_cfg: ml_collections.ConfigDict) -> tuple[str, float | None]:
    """How the module says it initialised `param` ('trunc_normal' with the group's std, 'zeros', 'ones'), or
    'module' where it does not say (its own init)."""
    init = param.get_metadata().get(parameterization.INIT_KEY, "module")
    return init, parameterization.init_std(model_cfg, group) if init == "trunc_normal" else None


def _forward(leaf: str, group: str, model_cfg: ml_collections.ConfigDict) -> dict[str, float]:
    forward = {}
    if group == "embedding":
        forward["embedding_output"] = parameterization.embedding_multiplier(model_cfg)
    if leaf == "wte":
        forward["output_logits"] = parameterization.output_logits_multiplier(model_cfg)
    if group == "attn_input":
        forward["attention_logits"] = parameterization.attention_scale(model_cfg)
    return forward


def param_table(config: ml_collections.ConfigDict, objective: Objective = LANGUAGE_MODELING) -> dict:
    """The table of a resolved config and the model its objective builds (see the module docstring)."""
    m, t = config.model, config.train
    rows = []
    model = nnx.eval_shape(lambda: objective.make_model(config, nnx.Rngs(0)))
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        group = parameterization.param_group(name, param)
        init, std = _init(group, param, m)
        lr_multiplier = parameterization.lr_multiplier(m, group)
        rows.append({"param": name, "group": group, "shape": list(param.shape), "init": init, "init_std": std,
                     "lr_multiplier": lr_multiplier, "peak_lr": t.peak_lr * lr_multiplier,
                     "weight_decay": t.weight_decay if parameterization.decays(name, param) else 0.0,
                     "forward": _forward(name.rsplit("/", 1)[-1], group, m)})
    groups = list(parameterization.GROUPS)
    rows.sort(key=lambda row: (groups.index(row["group"]), row["param"]))
    return {
        "parameterization": m.parameterization,
        "width_multiplier": parameterization.width_multiplier(m),
        "ff_width_multiplier": parameterization.ff_width_multiplier(m),
        "embedding_multiplier": parameterization.embedding_multiplier(m),
        "output_logits_multiplier": parameterization.output_logits_multiplier(m),
        "attention_scale": parameterization.attention_scale(m),
        "peak_lr": t.peak_lr,
        "weight_decay": t.weight_decay,
        "params": rows,
    }


def format_param_table(table: dict) -> str:
    """The table as aligned text for the log."""
    header = (f"parameterization {table['parameterization']}: width multiplier {table['width_multiplier']:.4g} "
              f"(d_ff {table['ff_width_multiplier']:.4g}); embeddings x{table['embedding_multiplier']:.4g}, "
              f"logits x{table['output_logits_multiplier']:.4g}, attention logits x{table['attention_scale']:.4g}; "
              f"peak LR {table['peak_lr']:.4g}")
    columns = ("param", "group", "shape", "init std", "LR mult", "peak LR", "decay", "forward")
    lines = [columns]
    for row in table["params"]:
        init = row["init"]
        std = f"{row['init_std']:.4g}" if init == "trunc_normal" else {"ones": "1", "zeros": "0"}.get(init, init)
        forward = ", ".join(f"{k} x{v:.4g}" for k, v in row["forward"].items())
        lines.append((row["param"], row["group"], "x".join(map(str, row["shape"])), std,
                      f"{row['lr_multiplier']:.4g}", f"{row['peak_lr']:.4g}", f"{row['weight_decay']:g}", forward))
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join([header] + ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                                 for line in lines])
