"""Chaos test: SIGKILL a tiny training run N times at random moments, resume it each time, and check that
its loss curve ends up bit-identical to an uninterrupted run of the same config.

    python -m cgpt_jax.tools.chaos --n=20 --workdir=/tmp/chaos

Each kill is one of three kinds, drawn at random: during start-up (imports, compile, restore), while
training (after a random number of new steps), or while an asynchronous checkpoint save is in flight (an
Orbax temporary directory exists). After every attempt, metrics.jsonl must be an exact prefix of the
uninterrupted run's (each step once, same losses); the last attempt runs to the end and must match it
entirely, summary included. Prints one line per kill, then `K/N resumes exact`; exits non-zero unless K = N.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import app, flags

from cgpt_jax import cli, run_dir
from cgpt_jax.train.checkpoint import COMMIT_MARKER

DEFAULT_CONFIG = "experiments/cerebras_gpt.py:size=tiny"
# Frequent saves and a line per step, so that kills land during saves and every step is compared.
DEFAULT_OVERRIDES = ("--config.train.steps=300", "--config.train.log_every=1", "--config.train.eval_every=50",
                     "--config.checkpoint.every_steps=10")
COMPARED = ("loss", "grad_norm", "lr", "eval_loss")  # deterministic values; timings differ run to run
KILL_KINDS = ("startup", "training", "saving")
_TMP_MARK = ".orbax-checkpoint-tmp"
_POLL_S = 0.002


@dataclasses.dataclass
class Result:
    kills: int
    exact: int
    lines: list[str]


def _curve(workdir: str) -> list[tuple]:
    """The compared values of metrics.jsonl, in file order (a torn last line, left by a kill, is ignored)."""
    path = run_dir.path(workdir, run_dir.METRICS)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.append((record["step"], tuple((k, record[k]) for k in COMPARED if k in record)))
    return out


def _last_step(workdir: str) -> int:
    curve = _curve(workdir)
    return curve[-1][0] if curve else -1


def _checkpoint_entries(workdir: str) -> list[str]:
    directory = run_dir.path(workdir, run_dir.CHECKPOINTS)
    return os.listdir(directory) if os.path.isdir(directory) else []


def _latest_checkpoint(workdir: str) -> int | None:
    steps = [int(n) for n in _checkpoint_entries(workdir)
             if n.isdigit() and os.path.exists(os.path.join(workdir, run_dir.CHECKPOINTS, n, COMMIT_MARKER))]
    return max(steps) if steps else None


def _wait(proc: subprocess.Popen, condition, timeout_s: float) -> bool:
    """Poll until `condition()` holds (True), the process exits or the timeout passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(_POLL_S)
    return False


def _saves_in_flight(workdir: str) -> set[str]:
    return {n for n in _checkpoint_entries(workdir) if _TMP_MARK in n}  # names carry a timestamp: unique


def _kill_at_random_moment(proc: subprocess.Popen, workdir: str, rng: random.Random, steps: int) -> str:
    """Wait for a random moment of one of KILL_KINDS, SIGKILL the process there, and describe the moment."""
    kind = rng.choice(KILL_KINDS)
    start_step, leftovers = _last_step(workdir), _saves_in_flight(workdir)
    if kind == "startup":
        time.sleep(rng.uniform(0.2, 5.0))
    elif kind == "training":
        target = start_step + rng.randint(1, max(2, steps // 10))
        _wait(proc, lambda: _last_step(workdir) >= target, timeout_s=300)
    else:
        _wait(proc, lambda: bool(_saves_in_flight(workdir) - leftovers), timeout_s=300)
        time.sleep(rng.uniform(0.0, 0.05))
    if proc.poll() is not None:
        raise RuntimeError(f"the run exited by itself (code {proc.returncode}) before a {kind} kill; give it "
                           f"more steps (--override=--config.train.steps=...) or use fewer kills")
    saving = sorted(n.split(".")[0] for n in _saves_in_flight(workdir) - leftovers)
    proc.kill()
    proc.wait()
    return (f"{kind}: SIGKILL with metrics.jsonl up to step {_last_step(workdir)}" +
            (f", during the save of checkpoint {saving[-1]}" if saving else ""))


def run_chaos(n: int, workdir: str, *, config: str = DEFAULT_CONFIG, overrides: Sequence[str] = DEFAULT_OVERRIDES,
              seed: int = 0, env: dict | None = None, log=print) -> Result:
    """Run the reference and the chaos run under `workdir` (both replaced) and compare them."""
    steps = next((int(o.split("=", 1)[1]) for o in reversed(overrides) if o.startswith("--config.train.steps=")),
                 300)
    rng = random.Random(seed)
    env = dict(os.environ if env is None else env)
    reference_dir, chaos_dir = os.path.join(workdir, "reference"), os.path.join(workdir, "chaos")
    for d in (reference_dir, chaos_dir):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)

    def start(run_dir: str, attempt: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "cgpt_jax.train", f"--config={config}", f"--workdir={run_dir}", *overrides]
        with open(os.path.join(workdir, f"{os.path.basename(run_dir)}-{attempt}.log"), "w") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    log(f"reference: an uninterrupted run in {reference_dir}")
    if start(reference_dir, 0).wait() != 0:
        raise RuntimeError(f"the reference run failed; see {workdir}/reference-0.log")
    expected = _curve(reference_dir)
    expected_summary = run_dir.read_json(run_dir.path(reference_dir, run_dir.SUMMARY))

    # Attempt 0 starts fresh and attempt k resumes after kill k; attempts 0..n-1 are killed, attempt n finishes.
    lines, exact = [], 0
    for attempt in range(n + 1):
        resumed_from = _latest_checkpoint(chaos_dir)
        proc = start(chaos_dir, attempt)
        if attempt < n:
            log(f"kill {attempt + 1}/{n}: {_kill_at_random_moment(proc, chaos_dir, rng, steps)}")
            curve = _curve(chaos_dir)
            ok = curve == expected[:len(curve)]  # each step once so far, with the reference's values
        else:
            if proc.wait() != 0:
                raise RuntimeError(f"the last resume failed; see {workdir}/chaos-{attempt}.log")
            summary = run_dir.read_json(run_dir.path(chaos_dir, run_dir.SUMMARY))
            ok = _curve(chaos_dir) == expected and all(
                summary[k] == expected_summary[k] for k in ("step", "final_train_loss", "final_eval_loss"))
        if attempt > 0:
            exact += ok
            lines.append(f"resume {attempt}/{n} from checkpoint {resumed_from}: {'exact' if ok else 'DIFFERS'}")
            log(lines[-1])
    lines.append(f"{exact}/{n} resumes exact")
    log(lines[-1])
    return Result(kills=n, exact=exact, lines=lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    result = run_chaos(args.n, cli.resolve_path(args.workdir), config=args.config,
                       overrides=args.override or DEFAULT_OVERRIDES, seed=args.seed)
    sys.exit(0 if result.exact == result.kills else 1)


if __name__ == "__main__":
    # Flags are defined only when run as a program: tests import this module next to modules whose flags
    # (--config, --workdir, --seed) have the same names.
    flags.DEFINE_integer("n", 20, "How many times to SIGKILL the run.")
    flags.DEFINE_string("workdir", "/tmp/cgpt_jax_chaos", "Holds reference/ and chaos/ (replaced).")
    flags.DEFINE_string("config", DEFAULT_CONFIG, "Experiment config, as for python -m cgpt_jax.train.")
    flags.DEFINE_multi_string("override", None, "A --config.x=y flag for both runs (repeatable); "
                              f"default: {' '.join(DEFAULT_OVERRIDES)}")
    flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
    cli.run(main)
