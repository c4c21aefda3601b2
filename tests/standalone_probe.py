"""Run by tests/test_standalone.py in a fresh interpreter: use a little of the product and report which
files it opened outside the interpreter's own folders.

    python standalone_probe.py  ->  one JSON line: {"opened": [...], "package": ..., ...}

An audit hook sees every `open` (imports included) from the moment it is installed, before cgpt_jax is
imported. The work: the shipped reference and its fit, an experiment found by the installed-experiments
rule and expanded into its sweep, a `--config` flag parsed, and a sweep launch template read.
"""
import json
import os
import site
import sys

_opened: set[str] = set()


def _record(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes)):
        _opened.add(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_record)

from pathlib import Path  # noqa: E402

from absl import flags  # noqa: E402

import cgpt_jax  # noqa: E402
from cgpt_jax import experiment_files  # noqa: E402
from cgpt_jax.scaling import fits, runner  # noqa: E402
from cgpt_jax.scaling.experiment import load_experiment  # noqa: E402
from cgpt_jax.scaling.reference import load_cerebras  # noqa: E402

ref = load_cerebras()
fit = fits.fit_compute_law(ref.flops, ref.loss, n_bootstrap=0)
runs = load_experiment("experiments/cpu_ladder.py").runs()
config = experiment_files.define_config_file("config", "probe")
sys.argv = ["probe", "--config=cerebras_gpt.py:size=tiny", "--config.model.d_model=32"]  # overrides come from argv
flags.FLAGS(sys.argv)
template = (runner.TEMPLATES / "sweep_slurm.sbatch.tmpl").read_text()

# The interpreter's own folders: its prefixes, its site-packages, and the kernel's pseudo-files.
own = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages(),
       *(p for p in sys.path if p.endswith("-packages")), "/proc", "/sys", "/dev"}
own = tuple(os.path.realpath(p) + os.sep for p in own)
print(json.dumps({
    "opened": sorted(p for p in _opened if not (p + os.sep).startswith(own)),
    "package": os.path.realpath(cgpt_jax.__file__),
    "experiment": os.path.realpath(experiment_files.resolve(Path("experiments/cpu_ladder.py"))),
    "models": ref.names,
    "fit_r2": fit.r2,
    "runs": [run.name for run in runs],
    "config_d_model": config.value.model.d_model,
    "config_n_layers": config.value.model.n_layers,
    "template_has_train_command": "{{train_command}}" in template,
}))
