"""python -m cgpt_jax.bench.report runs/cpu_bench/bench.jsonl → the markdown table of docs/performance.md.

One row per configuration (the last result of each label), cgpt_jax beside PyTorch eager where the run
compared them.
"""
from __future__ import annotations

import json

from absl import app

from cgpt_jax import cli
from cgpt_jax.errors import InputError


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(results: list[dict]) -> str:
    by_label = {r["label"]: r for r in results}
    first = next(iter(by_label.values()))
    peak_names = list(first["peaks"])
    header = ["config", "params", "tok/s cgpt_jax", "tok/s PyTorch", "ratio"]
    header += [f"MFU {name} cgpt_jax / PyTorch" for name in peak_names]
    header += ["compile s cgpt_jax", "peak MiB cgpt_jax / PyTorch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in by_label.items():
        ours = r["frameworks"]["cgpt_jax"]
        torch = r["frameworks"].get("pytorch_eager", {})
        row = [label, f"{ours['params']:,}", f"{ours['tokens_per_sec']:,.0f}",
               _cell(torch.get("tokens_per_sec"), ",.0f"), _cell(r.get("ratio_tokens_per_sec"), ".2f")]
        row += [f"{_cell(ours['mfu'][name], '.2f')} / {_cell(torch.get('mfu', {}).get(name), '.2f')}"
                for name in peak_names]
        row += [f"{ours['compile_s']:.1f}",
                f"{_cell(ours['peak_memory_mib'], '.0f')} / {_cell(torch.get('peak_memory_mib'), '.0f')}"]
        lines.append("| " + " | ".join(row) + " |")
    peaks = "; ".join(f"{name}: {'unknown' if p['flops'] is None else format(p['flops'] / 1e9, '.0f') + ' GFLOP/s'} "
                      f"({p['how']})" for name, p in first["peaks"].items())
    lines.append("")
    lines.append(f"Peaks: {peaks}. Devices: {first['devices']}, {first['compute_dtype']}; "
                 f"{first['rounds']} rounds × {first['steps_per_round']} steps per framework, taking turns.")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: python -m cgpt_jax.bench.report RESULTS.jsonl")
    with open(cli.resolve_path(argv[1])) as f:
        results = [json.loads(line) for line in f if line.strip()]
    if not results:
        raise InputError(f"{argv[1]} holds no results — give a RESULTS.jsonl that python -m cgpt_jax.bench wrote")
    print(table(results))


if __name__ == "__main__":
    cli.run(main)
