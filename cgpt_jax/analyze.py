"""Fit the finished runs of a sweep: `python -m cgpt_jax.analyze DIR [--reference=cerebras]`.

Writes DIR/report.md, DIR/fit.json and DIR/scaling.png (or into --out); when runs were scored with
`python -m cgpt_jax.evaluate sweep DIR`, also DIR/downstream.md and DIR/downstream.png (zero-shot results
against compute; with --reference=cerebras beside the published zero-shot table).
`--group_by=model.attention` (any dotted config field) fits one L(C) per value of the field instead, and
compares them in one plot and one table. A sweep of classification fine-tuning runs (experiments/peft_compare.py)
gets the methods' comparison instead (cgpt_jax/finetune/compare.py).
"""
from __future__ import annotations

from absl import app, flags

from cgpt_jax import cli, storage
from cgpt_jax.errors import InputError
from cgpt_jax.finetune import compare
from cgpt_jax.scaling import downstream
from cgpt_jax.scaling.analysis import analyze
from cgpt_jax.scaling.groups import analyze_groups
from cgpt_jax.scaling.report import write_grouped_and_describe, write_outputs
from cgpt_jax.scaling.results import FLOP_CONVENTIONS, PARAM_COUNTS

_REFERENCE = flags.DEFINE_enum("reference", None, ["cerebras"], "Overlay the published Cerebras-GPT points "
                               "and Eq. 1 on their own FLOP axis.")
_REFERENCE_PATH = flags.DEFINE_string("reference_path", None, "Another cerebras_gpt.json to overlay; default: "
                                      "the published values shipped in cgpt_jax/reference/cerebras_gpt.json.")
_FLOPS = flags.DEFINE_enum("flops", "cerebras", list(FLOP_CONVENTIONS), "FLOP convention of the compute axis.")
_PARAMS = flags.DEFINE_enum("params", "non_embedding", list(PARAM_COUNTS), "Which parameter count is N.")
_EXPERIMENT = flags.DEFINE_string("experiment", None, "When DIR mixes configs: a prefix of the group to fit.")
_GROUP_BY = flags.DEFINE_string("group_by", None, "A dotted config field (e.g. model.attention): one L(C) per "
                                "value, overlaid in one plot and compared in one table.")
_N_BOOTSTRAP = flags.DEFINE_integer("n_bootstrap", 1000, "Bootstrap refits for the confidence intervals.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")
_OUT = flags.DEFINE_string("out", None, "Where to write the report, fit and plot; default: DIR.")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: python -m cgpt_jax.analyze DIR [--reference=cerebras]")
    workdir = storage.path(argv[1])
    if compare.is_comparison(workdir):  # fine-tuning methods side by side (experiments/peft_compare.py)
        paths = compare.write_outputs(workdir, storage.path(_OUT.value) if _OUT.value else workdir)
        print(f"report: {paths['report']}\ntable:  {paths['table']}\nplot:   {paths['plot']}")
        return
    if _GROUP_BY.value is not None:
        _main_grouped(workdir)
        return
    try:
        analysis = analyze(workdir, experiment=_EXPERIMENT.value, flops=_FLOPS.value, params=_PARAMS.value,
                           reference=_REFERENCE.value,
                           reference_path=storage.path(_REFERENCE_PATH.value) if _REFERENCE_PATH.value
                           else None,
                           n_bootstrap=_N_BOOTSTRAP.value, seed=_SEED.value)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
    out_dir = storage.path(_OUT.value) if _OUT.value else workdir
    paths = write_outputs(analysis, out_dir)
    downstream_paths = downstream.write_outputs(analysis.runs, analysis.flops, out_dir, analysis.reference is not None)
    for law in (analysis.compute_law, analysis.chinchilla_law):
        if law is not None:
            ci = law.fit.ci or {}
            consts = ", ".join(f"{k}={v:.4g}" + (f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else "")
                               for k, v in law.fit.constants.items())
            print(f"{law.fit.formula}: {consts}; R²={law.fit.r2:.4f}")
    excluded = [r for r in analysis.runs if not r.usable]
    if excluded:
        print("excluded: " + "; ".join(f"{r.name} ({', '.join(r.problems)})" for r in excluded))
    print(f"report: {paths['report']}\nfit:    {paths['fit']}\nplot:   {paths['plot']}")
    if downstream_paths is not None:
        print(f"downstream: {downstream_paths['downstream_report']}, {downstream_paths['downstream_plot']}")


def _main_grouped(workdir: storage.Path) -> None:
    if _REFERENCE.value is not None:
        raise app.UsageError("--reference overlays one curve — drop it with --group_by")
    try:
        grouped = analyze_groups(workdir, _GROUP_BY.value, experiment=_EXPERIMENT.value, flops=_FLOPS.value,
                                 params=_PARAMS.value, n_bootstrap=_N_BOOTSTRAP.value, seed=_SEED.value)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
    print(write_grouped_and_describe(grouped, storage.path(_OUT.value) if _OUT.value else workdir))


if __name__ == "__main__":
    cli.run(main)
