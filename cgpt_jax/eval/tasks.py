"""Offline lm-eval tasks built from held-out standard-library source: data and task YAMLs, deterministic.

The text is the running interpreter's standard library, the main job's corpus; only files in its
validation split (`doc_split` at the corpus's `val_fraction`) are used, so no training run has seen
them. Three tasks, each a JSONL file and a YAML that lm-eval reads offline (`dataset_path: json`):

* `cgpt_stdlib_bpb` (loglikelihood_rolling): chunks of whole lines; bits per byte, byte and word
  perplexity.
* `cgpt_stdlib_nextline` (multiple_choice, HellaSwag-style): the previous lines of a file, then which of
  four lines of the same file comes next; acc and acc_norm (log-likelihood per byte).
* `cgpt_stdlib_lastident` (loglikelihood, LAMBADA-style): a line's final identifier, which also occurs in
  the lines before it; acc (the identifier is the greedy continuation) and perplexity.

Same interpreter, same arguments → byte-identical files (a fixed seed, files in path order).
"""
from __future__ import annotations

import functools
import json
import pathlib
import random
import re
from collections.abc import Iterator, Sequence

from cgpt_jax.data.corpus import doc_split, stdlib_source

VAL_FRACTION = 0.02  # the main job's config.data.val_fraction: the same held-out files
CONTEXT_LINES = 8
BPB_LINES = 24
MIN_LINE_CHARS = 12
_LAST_IDENT = re.compile(r"^(.*[^A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]{2,})\s*$")


@functools.cache  # the interpreter's standard library does not change while it runs
def heldout_files(val_fraction: float = VAL_FRACTION) -> Sequence[tuple[str, str]]:
    """(relative path, text) of the standard library's validation-split files, in path order."""
    source = stdlib_source(val_fraction)
    return tuple((rel, text) for _, rel, text in source.documents_with_paths()
                 if doc_split(text, val_fraction) == "validation")


def _substantial(line: str) -> bool:
    return len(line.strip()) >= MIN_LINE_CHARS


def bpb_docs(files: Sequence[tuple[str, str]], n: int) -> Iterator[dict]:
    """Consecutive chunks of BPB_LINES lines, taken round-robin over the files so that every file counts."""
    chunks = [[text.splitlines()[s:s + BPB_LINES] for s in range(0, len(text.splitlines()), BPB_LINES)]
              for _, text in files]
    emitted = 0
    for index in range(max(len(c) for c in chunks)):
        for file_chunks in chunks:
            if index < len(file_chunks) and any(_substantial(line) for line in file_chunks[index]):
                yield {"text": "\n".join(file_chunks[index]) + "\n"}
                emitted += 1
                if emitted == n:
                    return


def nextline_docs(files: Sequence[tuple[str, str]], n: int, rng: random.Random) -> Iterator[dict]:
    """Context: CONTEXT_LINES lines; choices: the true next line and three other lines of the same file."""
    candidates = []
    for _, text in files:
        lines = text.splitlines()
        pool = sorted({line for line in lines if _substantial(line)})
        for i in range(CONTEXT_LINES, len(lines)):
            if _substantial(lines[i]) and len(pool) >= 8:
                candidates.append((lines, pool, i))
    for lines, pool, i in rng.sample(candidates, min(n, len(candidates))):
        seen = set(lines[i - CONTEXT_LINES:i + 1])
        distractors = rng.sample([line for line in pool if line not in seen], 3)
        choices = [lines[i], *distractors]
        rng.shuffle(choices)
        yield {"context": "\n".join(lines[i - CONTEXT_LINES:i]) + "\n", "choices": choices,
               "gold": choices.index(lines[i])}


def lastident_docs(files: Sequence[tuple[str, str]], n: int, rng: random.Random) -> Iterator[dict]:
    """Lines ending in an identifier (3+ characters) that already occurs in the CONTEXT_LINES lines before."""
    candidates = []
    for _, text in files:
        lines = text.splitlines()
        for i in range(CONTEXT_LINES, len(lines)):
            match = _LAST_IDENT.match(lines[i])
            if match and not lines[i].lstrip().startswith("#"):
                before = "\n".join(lines[i - CONTEXT_LINES:i])
                if re.search(rf"\b{match.group(2)}\b", before):
                    candidates.append((before + "\n" + match.group(1), match.group(2)))
    for context, target in rng.sample(candidates, min(n, len(candidates))):
        yield {"context": context, "target": target}


def _yaml(task: str, data_file: pathlib.Path, body: str) -> str:
    # JSON strings are valid YAML scalars: the path needs no escaping rules of its own.
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(data_file))}\ntest_split: test\n{body}metadata:\n  version: 1.0\n")


TASK_BODIES = {
    "cgpt_stdlib_bpb": ('output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                        "metric_list:\n"
                        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
                        "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n"
                        "    higher_is_better: false\n"
                        "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
                        "    higher_is_better: false\n"),
    "cgpt_stdlib_nextline": ('output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
                             'doc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: ""\n'
                             "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                             "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"),
    "cgpt_stdlib_lastident": ('output_type: loglikelihood\ndoc_to_text: "{{context}}"\n'
                              'doc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
                              "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
                              "    higher_is_better: false\n  - metric: acc\n    aggregation: mean\n"
                              "    higher_is_better: true\n"),
}


TASKS = tuple(TASK_BODIES)
DEFAULT_DOCS = 200  # documents per task that `python -m cgpt_jax.evaluate tasks` writes by default
DEFAULT_SEED = 0


def parse_task_names(names: str) -> list[str]:
    """'a,b' → ['a', 'b'], each one of TASKS (ValueError naming the unknown ones and the available)."""
    parsed = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in parsed if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown offline tasks {unknown}; the available: {', '.join(TASKS)}")
    return parsed


def task_docs(files: Sequence[tuple[str, str]], n: int = DEFAULT_DOCS, seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    """Each task's documents (up to `n`), generated from `files` with `seed`."""
    return {"cgpt_stdlib_bpb": list(bpb_docs(files, n)),
            "cgpt_stdlib_nextline": list(nextline_docs(files, n, random.Random(seed))),
            "cgpt_stdlib_lastident": list(lastident_docs(files, n, random.Random(seed)))}


def write_tasks(out_dir: str | pathlib.Path, *, n: int = DEFAULT_DOCS, seed: int = DEFAULT_SEED,
                files: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """Write each task's JSONL (up to `n` documents) and YAML into `out_dir`; returns the task names.
    `files` defaults to the held-out standard library."""
    out = pathlib.Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs = task_docs(heldout_files() if files is None else files, n, seed)
    for task, rows in docs.items():
        data_file = out / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        (out / f"{task}.yaml").write_text(_yaml(task, data_file, TASK_BODIES[task]), encoding="utf-8")
    return list(docs)
