"""Reading a sweep workdir: every run with its status, its numbers, and why it may not be fitted."""
from __future__ import annotations

import dataclasses
import json
import math

from cgpt_jax import run_dir, storage
from cgpt_jax.run_dir import FLOP_CONVENTIONS, SUMMARY
from cgpt_jax.scaling.runner import FAILURE, RUN_RECORD, SWEEP_TABLE, read_json

PARAM_COUNTS = ("non_embedding", "total")
_RUN_FILES = (SUMMARY, FAILURE, RUN_RECORD, run_dir.CONFIG, run_dir.METRICS)
# A final eval loss this far above the run's best eval loss means training blew up late.
_DIVERGED_RISE = 1.2
NO_PROVENANCE = "(runs without sweep_run.json)"
# The keys of summary.json (cgpt_jax/run_dir.py) that a fit needs.
FITTED_SUMMARY_KEYS = ("final_eval_loss", "n_params", "n_params_non_embedding", "tokens",
                       *(f"flops_{c}" for c in FLOP_CONVENTIONS))


@dataclasses.dataclass
class Run:
    name: str
    path: storage.Path
    status: str  # 'finished' | 'unfinished' | 'failed' | 'pending' (listed in sweep.json, never started)
    group: str  # the experiment spec of the sweep that made the run; runs of one group share a recipe
    problems: list[str] = dataclasses.field(default_factory=list)  # why it is not fitted
    loss: float | None = None  # final validation loss
    n_params: float | None = None  # total
    n_params_non_embedding: float | None = None
    tokens: float | None = None
    flops: dict[str, float] = dataclasses.field(default_factory=dict)  # convention -> total
    tokens_per_sec: float | None = None  # the trainer's training throughput
    config: dict | None = None  # config.json, written by the trainer when the run starts
    planned_config: dict | None = None  # the config sweep_run.json records before the run starts

    @property
    def usable(self) -> bool:
        return self.status == "finished" and not self.problems

    def params(self, count: str) -> float:
        return self.n_params_non_embedding if count == "non_embedding" else self.n_params


def _group(record: dict | None) -> str:
    return NO_PROVENANCE if record is None else str(record.get("experiment"))


def _metrics_problems(path: storage.Path, final_loss: float) -> list[str]:
    """Divergence evidence in metrics.jsonl: non-finite losses, a late blow-up, ending above the start."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        for key in ("loss", "eval_loss"):
            if key in row and not math.isfinite(row[key]):
                return [f"diverged: {key}={row[key]} at step {row.get('step')}"]
    eval_losses = [row["eval_loss"] for row in rows if "eval_loss" in row]
    if eval_losses and final_loss > _DIVERGED_RISE * min(eval_losses):
        return [(f"diverged: final eval loss {final_loss:.4g} is more than {_DIVERGED_RISE}x the run's best "
                 f"eval loss {min(eval_losses):.4g}")]
    train_losses = [row["loss"] for row in rows if "loss" in row]
    if train_losses and final_loss > train_losses[0]:
        return [f"diverged: final eval loss {final_loss:.4g} is above the first train loss {train_losses[0]:.4g}"]
    return []


def _read_run(path: storage.Path) -> Run:
    record = read_json(path / RUN_RECORD) if (path / RUN_RECORD).is_file() else None
    run = Run(name=path.name, path=path, status="unfinished", group=_group(record),
              planned_config=None if record is None else record.get("config"))
    if (path / run_dir.CONFIG).is_file():
        run.config = read_json(path / run_dir.CONFIG)
    summary = read_json(path / SUMMARY) if (path / SUMMARY).is_file() else None
    if summary is None or summary.get("status") != run_dir.FINISHED:
        if (path / FAILURE).is_file():
            failure = read_json(path / FAILURE)
            run.status = "failed"
            run.problems.append(f"failed: {failure.get('reason', 'see failure.json')}")
        else:
            run.problems.append("unfinished: no summary.json" if summary is None
                                else f"unfinished: summary.json status is {summary.get('status')!r}")
        return run

    run.status = "finished"
    missing = [k for k in FITTED_SUMMARY_KEYS if summary.get(k) is None]
    if missing:
        run.problems.append(f"summary.json lacks {missing}")
        return run
    run.loss = float(summary["final_eval_loss"])
    run.n_params = float(summary["n_params"])
    run.n_params_non_embedding = float(summary["n_params_non_embedding"])
    run.tokens = float(summary["tokens"])
    run.flops = {c: float(summary[f"flops_{c}"]) for c in FLOP_CONVENTIONS}
    if summary.get("tokens_per_sec") is not None:
        run.tokens_per_sec = float(summary["tokens_per_sec"])
    if not math.isfinite(run.loss):
        run.problems.append(f"non-finite final eval loss {run.loss}")
    else:
        run.problems += _metrics_problems(path / run_dir.METRICS, run.loss)
    return run


def collect_runs(workdir: str | storage.Path) -> list[Run]:
    """Every run directory under `workdir`, a local directory or a bucket (plus runs sweep.json lists that
    never started)."""
    workdir = storage.path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir a sweep wrote to")
    runs = [_read_run(p) for p in sorted(workdir.iterdir())
            if p.is_dir() and any((p / f).exists() for f in _RUN_FILES)]
    if (workdir / SWEEP_TABLE).is_file():
        table = read_json(workdir / SWEEP_TABLE)
        known = {r.name for r in runs}
        for name in sorted(set(table.get("runs", {})) - known):
            runs.append(Run(name=name, path=workdir / name, status="pending", group=_group(table),
                            problems=["pending: listed in sweep.json, never started"]))
    if not runs:
        raise ValueError(f"{workdir} holds no runs (no subdirectory with {SUMMARY} or {RUN_RECORD}); "
                         f"run `python -m cgpt_jax.sweep --config=experiments/FILE.py --workdir={workdir}` first")
    return runs


def _config_value(config: dict | None, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_value(run: Run, dotted: str):
    """A dotted config field of `run` (e.g. 'model.attention'): from config.json, else from the config
    sweep_run.json planned (runs that have not started yet); None when neither records it."""
    value = _config_value(run.config, dotted)
    return _config_value(run.planned_config, dotted) if value is None else value


def select_group(runs: list[Run], group: str | None) -> list[Run]:
    """The runs of one recipe. Several groups without a choice is an error that lists them; within the
    group, runs that trained on different data or vocabularies are refused."""
    groups = sorted({r.group for r in runs})
    if group is None and len(groups) > 1:
        listing = "\n".join(f"  {g}: {sum(r.group == g for r in runs)} runs" for g in groups)
        raise ValueError(f"the workdir mixes runs of {len(groups)} sweeps, which must not share one fit:\n"
                         f"{listing}\nchoose one with --experiment=SPEC (a prefix of the names above is "
                         f"enough) or move the other runs to their own workdir")
    if group is not None:
        matches = [g for g in groups if g.startswith(group)]
        if len(matches) != 1:
            raise ValueError(f"--experiment={group!r} matches {len(matches)} of the groups {groups}; "
                             f"give a prefix that matches exactly one")
        group = matches[0]
    else:
        group = groups[0]
    chosen = [r for r in runs if r.group == group]
    for key in ("data.source", "data.tokenizer", "model.vocab_size"):
        values = {json.dumps(_config_value(r.config, key)) for r in chosen if r.config is not None}
        if len(values) > 1:
            raise ValueError(f"runs in {group} disagree on {key} ({sorted(values)}); losses on different data "
                             f"or vocabularies are not one curve. Put them in separate workdirs")
    return chosen
