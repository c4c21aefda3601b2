"""lm-evaluation-harness: cgpt_jax's model against lm-eval's own `hf` backend on one random HF GPT-2
checkpoint and the offline tasks, both run through `python -m cgpt_jax.evaluate` (lm-eval's CLI), offline.
Also: text-level conventions, the offline task generators, bad input."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import sysconfig

import pytest

from cgpt_jax.eval import tasks
from cgpt_jax.eval.bench import random_hf_checkpoint
from tests.helpers import one_device_env

pytest.importorskip("lm_eval", reason="needs the [eval] extra (pip install 'cgpt_jax[eval]')")
pytest.importorskip("transformers", reason="lm-eval's hf backend needs the [torch] extra")

REPO = pathlib.Path(__file__).resolve().parents[1]
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
SOURCE_FILES = ["textwrap.py", "json/encoder.py", "csv.py"]


def source_files() -> list[tuple[str, str]]:
    return [(name, (STDLIB / name).read_text(encoding="utf-8")) for name in SOURCE_FILES]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    """A random GPT-2 (every weight perturbed) with a 400-token byte-level BPE, saved for both backends."""
    directory = tmp_path_factory.mktemp("hf_gpt2")
    random_hf_checkpoint(directory, "".join(text for _, text in source_files()), vocab=400, d_model=32,
                         n_layers=2, n_heads=4, positions=96)
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("tasks")
    tasks.write_tasks(directory, n=24, files=source_files())
    return directory


def run_evaluate(args: list[str], home: pathlib.Path) -> subprocess.Popen:
    env = one_device_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(home),
                         TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "cgpt_jax.evaluate", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def responses(row: dict) -> list[tuple[float, str]]:
    """(log-likelihood, is_greedy) of each request of a logged sample (lm-eval writes them as strings)."""
    return [(float(r[0][0]), r[0][1]) if isinstance(r[0], list) else (float(r[0]), "") for r in row["resps"]]


def samples(out: pathlib.Path, task: str) -> list[dict]:
    (file,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    return sorted(rows, key=lambda row: row["doc_id"])


def test_parity_with_lm_eval_hf_backend(hf_dir, task_dir, tmp_path):
    common = ["--tasks", "cgpt_stdlib_nextline,cgpt_stdlib_lastident,cgpt_stdlib_bpb", "--include_path",
              str(task_dir), "--batch_size", "8", "--log_samples"]
    theirs = run_evaluate(["--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32", "--device", "cpu",
                           "--output_path", str(tmp_path / "hf"), *common], tmp_path / "home_hf")
    ours = run_evaluate(["--model", "cgpt_jax", "--model_args", f"hf={hf_dir}", "--output_path",
                         str(tmp_path / "ours"), *common], tmp_path / "home_ours")
    for process in (theirs, ours):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    n_requests = 0
    for task in ("cgpt_stdlib_nextline", "cgpt_stdlib_lastident"):
        for mine, reference in zip(samples(tmp_path / "ours", task), samples(tmp_path / "hf", task), strict=True):
            for (ll, greedy), (ll_ref, greedy_ref) in zip(responses(mine), responses(reference), strict=True):
                assert ll == pytest.approx(ll_ref, abs=1e-4)
                assert greedy == greedy_ref
                n_requests += 1
            for metric in ("acc", "acc_norm"):
                assert mine.get(metric) == reference.get(metric)
    assert n_requests == 24 * 4 + 24
    bpb = "cgpt_stdlib_bpb"
    for mine, reference in zip(samples(tmp_path / "ours", bpb), samples(tmp_path / "hf", bpb), strict=True):
        # A whole document's log-likelihood: a sum over hundreds of tokens.
        assert responses(mine)[0][0] == pytest.approx(responses(reference)[0][0], rel=1e-5)


def test_task_generators_are_deterministic(tmp_path):
    files = source_files()
    first = tasks.write_tasks(tmp_path / "a", n=30, files=files)
    tasks.write_tasks(tmp_path / "b", n=30, files=files)
    for task in first:
        a, b = (tmp_path / d / f"{task}.jsonl" for d in "ab")
        assert a.read_bytes() == b.read_bytes() and a.read_bytes()
    other = tasks.write_tasks(tmp_path / "c", n=30, seed=1, files=files)
    assert (tmp_path / "c" / f"{other[1]}.jsonl").read_bytes() != (tmp_path / "a" / f"{first[1]}.jsonl").read_bytes()
    for row in map(json.loads, (tmp_path / "a" / "cgpt_stdlib_nextline.jsonl").read_text().splitlines()):
        assert len(set(row["choices"])) == 4 and 0 <= row["gold"] < 4
    for row in map(json.loads, (tmp_path / "a" / "cgpt_stdlib_lastident.jsonl").read_text().splitlines()):
        assert row["target"] in row["context"]  # predictable from the context, LAMBADA-style


def test_bad_input(hf_dir, task_dir, tmp_path, monkeypatch, capsys):
    from cgpt_jax import evaluate
    from cgpt_jax.errors import InputError
    from cgpt_jax.eval.text import TextModel
    from cgpt_jax.generate import load

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", sys.argv)  # evaluate.main hands its argv to lm-eval's CLI through sys.argv
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["evaluate", "--model", "cgpt_jax", "--model_args", f"hf={tmp_path}", "--tasks",
                       "cgpt_stdlib_nextline", "--include_path", str(task_dir)])
    assert exit_.value.code == 2
    assert f"error: --checkpoint={tmp_path}: no config.json there" in capsys.readouterr().err
    model = TextModel(load(str(hf_dir))[0])
    with pytest.raises(InputError, match="tokenizes to nothing"):
        model.loglikelihood([("def f", "x"), ("def f", "")])


def test_generate_until_matches_transformers_greedy(hf_dir):
    import torch
    import transformers

    from cgpt_jax.eval.text import TextModel
    from cgpt_jax.generate import load

    reference_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    contexts, budgets = ["def f(x):\n    return", "class A:\n", "import os\n"], [12, 12, 5]
    expected = []
    for context, budget in zip(contexts, budgets):
        ids = torch.tensor([tokenizer.encode(context)])
        with torch.no_grad():
            out = reference_model.generate(ids, max_new_tokens=budget, do_sample=False,
                                           pad_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    stop = expected[0][4:6]  # a stop string that the first continuation meets: it is cut before it
    requests = [(contexts[0], [stop], budgets[0]), (contexts[1], ["never appears"], budgets[1]),
                (contexts[2], [], budgets[2])]
    got = TextModel(load(str(hf_dir))[0], batch_size=2).generate_until(requests)
    assert got == [expected[0].split(stop)[0], expected[1], expected[2]]
    assert len(got[0]) < len(expected[0])


def test_sweep_lists_unfinished_runs(tmp_path, monkeypatch, capsys):
    from cgpt_jax import evaluate

    (tmp_path / "sweep/d16l2").mkdir(parents=True)
    (tmp_path / "sweep/d16l2/summary.json").write_text(json.dumps({"status": "preempted"}))
    (tmp_path / "sweep/d24l2").mkdir()
    (tmp_path / "sweep/d24l2/config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["evaluate", "sweep", str(tmp_path / "sweep"), "--tasks", "cgpt_stdlib_nextline"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "skipping 2 runs that are not finished: d16l2 (unfinished), d24l2 (unfinished)" in err
    assert "has no finished runs" in err
    with pytest.raises(SystemExit):
        evaluate.main(["evaluate", "sweep", str(tmp_path / "missing"), "--tasks", "cgpt_stdlib_nextline"])
    assert "error: workdir" in capsys.readouterr().err
