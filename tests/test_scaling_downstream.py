"""Downstream scaling outputs: runs' downstream.json read in compute order, unfinished runs left out, the
table and the plot (with the published zero-shot panel) written."""
from __future__ import annotations

import json

from cgpt_jax.run_dir import DOWNSTREAM
from cgpt_jax.scaling import downstream
from cgpt_jax.scaling.results import Run


def make_run(tmp_path, name: str, flops: float, loss: float, acc: float | None, status: str = "finished") -> Run:
    path = tmp_path / name
    path.mkdir()
    if acc is not None:
        results = {"cgpt_stdlib_nextline": {"alias": "cgpt_stdlib_nextline", "acc,none": acc,
                                            "acc_stderr,none": 0.03, "acc_norm,none": acc + 0.25},
                   "cgpt_stdlib_bpb": {"bits_per_byte,none": 3.0 - acc, "bits_per_byte_stderr,none": "N/A"}}
        (path / DOWNSTREAM).write_text(json.dumps({"tasks": list(results), "limit": None, "results": results}))
    return Run(name=name, path=path, status=status, group="g", loss=loss, flops={"cerebras": flops})


def test_collect_report_and_plot(tmp_path):
    runs = [make_run(tmp_path, "big", 1e12, 3.0, 0.4), make_run(tmp_path, "small", 1e11, 4.0, 0.3),
            make_run(tmp_path, "not_scored", 5e11, 3.5, None),
            make_run(tmp_path, "running", 2e12, 2.9, 0.5, status="unfinished")]
    points = downstream.collect(runs, "cerebras")
    assert [p.name for p in points] == ["small", "big"]
    assert points[1].metrics == {"cgpt_stdlib_nextline/acc": 0.4, "cgpt_stdlib_nextline/acc_norm": 0.65,
                                 "cgpt_stdlib_bpb/bits_per_byte": 2.6}
    report = downstream.report_md(points, "cerebras")
    assert "| small | 1e+11 | 4.0000 | 2.7 | 0.3 | 0.55 |" in report
    paths = downstream.write_outputs(runs, "cerebras", tmp_path, with_reference=True)
    assert paths["downstream_plot"].stat().st_size > 10_000
    assert downstream.write_outputs(runs[2:], "cerebras", tmp_path, with_reference=False) is None


def test_published_zero_shot_table():
    flops, table = downstream.published_zero_shot()
    assert len(flops) == 7 and flops == sorted(flops)
    assert table["average"][0] == 0.315 and table["average"][-1] == 0.57  # 111M and 13B, SP
