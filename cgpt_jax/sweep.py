"""Run a sweep: `python -m cgpt_jax.sweep --config=experiments/FILE.py[:ARG] --workdir=DIR [--launcher=...]`.

local (default): trains the runs one after another, each in its own process, skipping finished runs,
re-launching unfinished ones (the trainer resumes them) and recording failures without stopping.
tpu / slurm: writes one launch script per run from cgpt_jax/scaling/templates/ and prints how to submit them.
Then: `python -m cgpt_jax.analyze DIR`.
"""
from __future__ import annotations

import shlex
import sys

from absl import app, flags

from cgpt_jax import cli, storage
from cgpt_jax.errors import InputError
from cgpt_jax.scaling import runner
from cgpt_jax.scaling.experiment import load_experiment, train_command

_CONFIG = flags.DEFINE_string("config", None, "Experiment file and argument: experiments/FILE.py[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; each run trains in WORKDIR/<name>.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", *runner.LAUNCHERS], "Where the runs train.")
_LAUNCHER_OPTS = flags.DEFINE_string(
    "launcher_opts", "", "KEY=VALUE,... for tpu (repo, python, workdir) or slurm (repo, python, workdir, "
    "nodes, gpus_per_node, time, partition, account); workdir is where runs write on the cluster.")
_SKIP_FAILED = flags.DEFINE_bool("skip_failed", False, "local: leave runs that failed before alone.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each run's training command and exit.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    workdir = storage.path(cli.resolve_path(_WORKDIR.value))  # a local directory, gs:// or s3://
    try:
        experiment = load_experiment(_CONFIG.value)
        runs = experiment.runs()
        if _DRY_RUN.value:
            for run in runs:
                print(shlex.join(train_command(experiment, run, str(workdir / run.name))))
            return
        if _LAUNCHER.value == "local":
            storage.check_workdir(str(workdir))
            try:
                statuses = runner.run_local(experiment, runs, workdir, skip_failed=_SKIP_FAILED.value)
            except KeyboardInterrupt:
                print("interrupted; re-run the same command to resume", file=sys.stderr)
                sys.exit(130)
            failed = [name for name, status in statuses.items() if status != "finished"]
            print(f"{len(runs) - len(failed)}/{len(runs)} runs finished; status table: {workdir / runner.SWEEP_TABLE}")
            if failed:
                print(f"not finished: {', '.join(failed)} (see DIR/<name>/failure.json); re-run this command "
                      f"to retry them")
            print(f"analyse: python -m cgpt_jax.analyze {workdir}")
            sys.exit(1 if failed else 0)
        opts = runner.parse_launcher_opts(_LAUNCHER.value, _LAUNCHER_OPTS.value)
        scripts = runner.write_launch_scripts(experiment, runs, workdir, _LAUNCHER.value, opts)
    except (FileNotFoundError, TypeError, ValueError) as e:
        raise InputError(str(e)) from e
    print(f"wrote {len(scripts)} launch scripts ({len(runs) - len(scripts)} runs already finished):")
    for script in scripts:
        print(f"  {script}")
    if _LAUNCHER.value == "tpu":
        print(f"submit (one run after another on the pod): TPU_NAME=... ZONE=... bash {workdir / 'submit_all.sh'}")
    else:
        print(f"submit (one sbatch per run): bash {workdir / 'submit_all.sh'}")
    print(f"then copy the run directories back into {workdir} and run: python -m cgpt_jax.analyze {workdir}")


if __name__ == "__main__":
    cli.run(main)
