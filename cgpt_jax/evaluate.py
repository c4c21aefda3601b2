"""Zero-shot evaluation with lm-evaluation-harness (the `[eval]` extra).

    python -m cgpt_jax.evaluate --model cgpt_jax --model_args checkpoint=RUN_DIR|hf=PATH[,tensor_parallel=N] \
        --tasks TASKS [--include_path DIR] [--batch_size 32] [--output_path OUT --log_samples] [...]
    python -m cgpt_jax.evaluate tasks OUT_DIR [--n 200] [--seed 0]
    python -m cgpt_jax.evaluate sweep SWEEP_DIR --tasks TASKS [--include_path DIR] [--batch_size 32] [--limit N]

The first form is lm-eval's own command line, unchanged: cgpt_jax's model is registered as `cgpt_jax`
(lm-eval has no plug-in discovery), then lm-eval's CLI runs, so flags, printed tables and output files
are lm-eval's. `tasks` writes the offline standard-library tasks (cgpt_jax/eval/tasks.py) for
`--include_path OUT_DIR`. `sweep` scores the final checkpoint of every finished run of a sweep directory
and writes each run's lm-eval results to RUN/downstream.json (read by `python -m cgpt_jax.analyze`);
unfinished runs are skipped and listed. Local task files load offline under HF_DATASETS_OFFLINE=1.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from cgpt_jax import cli, storage
from cgpt_jax.errors import InputError
from cgpt_jax.run_dir import DOWNSTREAM, FINISHED, write_json_atomically


def _write_tasks(argv: list[str]) -> None:
    from cgpt_jax.eval.tasks import DEFAULT_DOCS, DEFAULT_SEED, write_tasks

    parser = argparse.ArgumentParser(prog="python -m cgpt_jax.evaluate tasks")
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=DEFAULT_DOCS, help="documents per task (at most)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    if storage.is_remote(args.out_dir):  # lm-eval's --include_path and its datasets loader read local files
        raise InputError(f"{args.out_dir}: task files must be written to a local directory (lm-eval reads "
                         f"--include_path from the local disk) — give a local path")
    out = pathlib.Path(cli.resolve_path(args.out_dir))
    for task in write_tasks(out, n=args.n, seed=args.seed):
        rows = sum(1 for _ in (out / f"{task}.jsonl").open(encoding="utf-8"))
        print(f"{task}: {rows} documents in {out / (task + '.jsonl')}")
    print(f"use them with --include_path {out} (and HF_DATASETS_OFFLINE=1)")


def _sweep(argv: list[str]) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cgpt_jax.eval.harness import CgptJaxLM
    from cgpt_jax.scaling.results import collect_runs

    parser = argparse.ArgumentParser(prog="python -m cgpt_jax.evaluate sweep")
    parser.add_argument("sweep_dir")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include_path", default=None, help="a directory of extra task YAMLs")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    args = parser.parse_args(argv)
    workdir = storage.path(cli.resolve_path(args.sweep_dir))  # local, gs:// or s3://
    try:
        runs = collect_runs(workdir)
    except (FileNotFoundError, ValueError) as e:  # no such directory, or no runs in it
        raise InputError(str(e)) from e
    finished = [run for run in runs if run.status == FINISHED]
    skipped = [run for run in runs if run.status != FINISHED]
    if skipped:
        print(f"skipping {len(skipped)} runs that are not finished: "
              + ", ".join(f"{run.name} ({run.status})" for run in skipped), file=sys.stderr)
    if not finished:
        raise InputError(f"{workdir} has no finished runs — train them first (python -m cgpt_jax.sweep)")
    task_manager = TaskManager(include_path=cli.resolve_optional_path(args.include_path))
    tasks = [t for t in args.tasks.split(",") if t]
    for run in finished:
        model = CgptJaxLM(checkpoint=str(run.path), batch_size=args.batch_size)
        results = lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager, limit=args.limit)
        write_json_atomically(str(run.path / DOWNSTREAM), {"tasks": tasks, "limit": args.limit,
                                                           "results": results["results"]})
        print(f"{run.name}: " + json.dumps(results["results"], sort_keys=True))


def main(argv: list[str]) -> None:
    """`argv` as sys.argv: the program name first."""
    try:
        if len(argv) > 1 and argv[1] == "tasks":
            _write_tasks(argv[2:])
        elif len(argv) > 1 and argv[1] == "sweep":
            _sweep(argv[2:])
        else:
            from lm_eval.__main__ import cli_evaluate

            import cgpt_jax.eval.harness  # noqa: F401  (registers --model cgpt_jax)

            sys.argv = argv
            cli_evaluate()
    except InputError as e:
        cli.refuse(e.problems, e)


if __name__ == "__main__":
    main(sys.argv)
