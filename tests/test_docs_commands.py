"""The commands of the README's and docs' ```bash blocks work as written.

Every documented command is listed in COMMANDS below, either run (from a scratch directory, so that its
relative paths are resolved as a user's would be, with this interpreter for `.venv/bin/python`) or
skipped with its reason; a command added to the docs without an entry fails `test_every_documented_
command_is_listed`. Runs marked slow (minutes) need `--run-slow` (`bash launch/test.sh --run-slow`).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PY = ".venv/bin/python"


@dataclasses.dataclass(frozen=True)
class Entry:
    run: bool
    reason: str = ""  # why it is skipped, or why it is slow
    slow: bool = False


def run(slow: str = "") -> Entry:
    return Entry(True, slow, slow=bool(slow))


def skip(reason: str) -> Entry:
    return Entry(False, reason)


# Documented command (comments dropped, continuation lines joined) -> what this test does with it.
COMMANDS = {
    "bash launch/local.sh": skip("sets up .venv and trains the whole CPU ladder (about 5 min); the ladder's sweep "
                                 "and analysis are run below with --run-slow"),
    "bash launch/test.sh": skip("runs this test suite"),
    "bash launch/setup.sh": skip("installs .venv; the test run itself is its check"),
    f"{PY} -m cgpt_jax.train --config=experiments/cerebras_gpt.py:size=tiny --workdir=runs/tiny": run(),
    f"{PY} -m cgpt_jax.train --config=experiments/cerebras_gpt.py:size=111m --workdir=runs/111m "
    "--config.data.source=tfds --config.data.tfds_name=c4/en --config.data.tokenizer=gpt2 "
    "--config.model.compute_dtype=bfloat16 --config.mesh.data=-1 --config.mesh.fsdp=4":
        skip("needs the C4 dataset (network) and an accelerator mesh of 4+ devices for 111M"),
    f"{PY} -m cgpt_jax.bench --config=experiments/cpu_bench.py:size=d64l2 --compare=torch":
        run("5 rounds of a d64 model in two frameworks, about a minute"),
    f"{PY} -m cgpt_jax.plan --config=experiments/cerebras_gpt.py:size=13b --mesh=fsdp=16,tensor=4 --device=tpu_v5p "
    "--config.model.vocab_pad_multiple=128 --config.model.remat=full --config.train.micro_batches=5":
        run("compiles 13B for 64 fake devices: 20-50 s"),
    f"{PY} -m cgpt_jax.sweep --config=experiments/cpu_ladder.py --workdir=runs/cpu_ladder":
        run("trains the eight-run CPU ladder, about 3.5 minutes"),
    f"{PY} -m cgpt_jax.analyze runs/cpu_ladder --reference=cerebras": run("needs the ladder's sweep"),
    f"{PY} -m cgpt_jax.generate --checkpoint=runs/tiny --prompt_ids=1,2,3 --max_new_tokens=20": run(),
    f"{PY} -m cgpt_jax.sweep --config=experiments/attention_variants.py:sizes=d16l2/d24l2/d32l2/d48l2 "
    "--workdir=runs/attention_variants": skip("28 runs, about 27 minutes"),
    f"{PY} -m cgpt_jax.analyze runs/attention_variants --group_by=model.attention":
        skip("needs the attention-variant sweep; --group_by is tested in tests/test_scaling_groups.py"),
    "bash launch/multiprocess_cpu.sh 2 4 --config=experiments/cerebras_gpt.py:size=tiny --workdir=runs/mp":
        skip("writes runs/mp inside the repository; the same processes are tests/test_distributed.py"),
    "bash launch/tpu_pod.sh MY_TPU us-central2-b --config=experiments/cerebras_gpt.py:size=1.3b "
    "--workdir=/mnt/runs/1.3b --watchdog_s=1800": skip("needs a TPU pod and gcloud"),
    "sbatch --nodes=4 launch/slurm.sbatch --config=experiments/cerebras_gpt.py:size=6.7b "
    "--workdir=/shared/runs/6.7b --watchdog_s=1800": skip("needs a SLURM cluster"),
    "bash launch/cpu_bench.sh": skip("every benchmark size, about 10 minutes; one size is run above"),
    f"{PY} -m cgpt_jax.bench.report runs/cpu_bench/bench.jsonl": skip("reads launch/cpu_bench.sh's results"),
    "bash launch/gpu_bench.sh": skip("needs a GPU"),
    f"{PY} -m cgpt_jax.evaluate tasks runs/eval_tasks": run("reads the standard library, a few seconds"),
    f"HF_DATASETS_OFFLINE=1 {PY} -m cgpt_jax.evaluate --model cgpt_jax --model_args checkpoint=runs/cpu_ladder/d80l2 "
    "--tasks cgpt_stdlib_bpb,cgpt_stdlib_nextline,cgpt_stdlib_lastident --include_path runs/eval_tasks --batch_size 32":
        skip("needs the ladder's runs; the same CLI runs in tests/test_eval_harness.py"),
    f"HF_DATASETS_OFFLINE=1 {PY} -m cgpt_jax.evaluate sweep runs/cpu_ladder "
    "--tasks cgpt_stdlib_bpb,cgpt_stdlib_nextline,cgpt_stdlib_lastident --include_path runs/eval_tasks":
        skip("needs the ladder's runs; about 4 minutes"),
    f"HF_DATASETS_OFFLINE=1 {PY} -m cgpt_jax.eval.bench": skip("a speed measurement, about 4 minutes"),
    f"{PY} -m cgpt_jax.train --config=experiments/cpu_ladder.py:size=d48l2 --workdir=runs/d48l2_tasks "
    "--config.eval.tasks=cgpt_stdlib_nextline,cgpt_stdlib_lastident,cgpt_stdlib_bpb --config.eval.limit=100":
        skip("a d48l2 rung with five task evaluations, minutes; tests/test_eval_during_training.py trains with a task"),
    f"HF_DATASETS_OFFLINE=1 {PY} -m cgpt_jax.evaluate --model cgpt_jax --model_args checkpoint=runs/d48l2_tasks "
    "--tasks cgpt_stdlib_nextline,cgpt_stdlib_lastident,cgpt_stdlib_bpb --include_path runs/eval_tasks --limit 100 "
    "--batch_size 32": skip("needs the run above; tests/test_eval_during_training.py scores a checkpoint the same way"),
    f"{PY} -m cgpt_jax.finetune --config=experiments/classify.py:task=stdlib_topics,init=runs/cpu_ladder/d80l2 "
    "--workdir=runs/cls/pretrained": skip("needs the ladder's d80l2 run; fine-tuning runs in tests/test_finetune.py"),
    f"{PY} -m cgpt_jax.finetune --config=experiments/classify.py:task=stdlib_topics,init=runs/cpu_ladder/d80l2,"
    "scratch=True --workdir=runs/cls/scratch": skip("needs the ladder's d80l2 run (its shape and tokenizer)"),
    f"{PY} -m cgpt_jax.classify --checkpoint=runs/cls/pretrained '--text=async def main(): await asyncio.sleep(1)'":
        skip("needs the fine-tuned run; the command runs in tests/test_classify.py"),
    f"{PY} -m cgpt_jax.classify --checkpoint=runs/cls/pretrained --input=texts.jsonl --output=predictions.csv":
        skip("needs the fine-tuned run and a texts.jsonl; tests/test_classify.py reads and writes both kinds"),
    f"{PY} -m cgpt_jax.finetune.speed --backbone=runs/cpu_ladder/d80l2": skip("a speed measurement of the "
                                                                              "ladder's d80l2, about 3 minutes"),
    f"{PY} -m cgpt_jax.finetune --config=experiments/classify.py:task=stdlib_topics,init=runs/cpu_ladder/d80l2 "
    "--workdir=runs/cls/lora '--config.finetune.method=lora(rank=8, alpha=16)' --config.train.peak_lr=1e-3":
        skip("needs the ladder's d80l2 run; LoRA fine-tuning runs in tests/test_peft_conformance.py"),
    f"{PY} -m cgpt_jax.train --config=experiments/cpu_ladder.py:size=d80l2 --workdir=runs/lm_lora "
    "--init_from=runs/cpu_ladder/d80l2 '--config.finetune.method=lora(rank=4)'":
        skip("needs the ladder's d80l2 run; --init_from with LoRA runs in tests/test_peft_inputs.py"),
    f"{PY} -m cgpt_jax.train --config=experiments/cpu_ladder.py:size=d80l2 --workdir=runs/lm_prefix "
    "--init_from=runs/cpu_ladder/d80l2 '--config.finetune.method=prefix(tokens=10)' --config.train.seq_len=118":
        skip("needs the ladder's d80l2 run; prefix training and decoding run in tests/test_peft_conformance.py"),
    f"{PY} -m cgpt_jax.generate --checkpoint=runs/lm_prefix '--prompt=def main(' --max_new_tokens=30":
        skip("needs the run above; generation with a prefix runs in tests/test_peft_virtual_tokens.py"),
    f"{PY} -m cgpt_jax.sweep --config=experiments/peft_compare.py:init=runs/cpu_ladder/d80l2 "
    "--workdir=runs/peft_compare": skip("needs the ladder's d80l2 run; seven fine-tuning runs, about an hour here"),
    f"{PY} -m cgpt_jax.analyze runs/peft_compare": skip("needs the comparison sweep; tests/test_peft_compare.py "
                                                        "analyzes a synthetic one"),
    f"{PY} -m cgpt_jax.train --config=experiments/cpu_ladder.py:size=d80l2 --workdir=runs/peft_backbone":
        skip("trains the ladder's largest rung, about 5 minutes; the ladder's sweep runs above with --run-slow"),
    f"{PY} -m cgpt_jax.sweep --config=experiments/peft_compare.py:init=runs/peft_backbone,steps=150,eval_every=50 "
    "--workdir=runs/peft_compare": skip("needs the backbone above; seven fine-tuning runs, 35 minutes here"),
    f"{PY} -m cgpt_jax.serve --checkpoint=runs/tiny --max_batch=16 --cache_len=128":
        skip("a server, up until stopped; tests/test_serve.py runs the command (SIGTERM drain) and its endpoints"),
    "curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d "
    "'{\"prompt\": [1, 2, 3], \"max_tokens\": 8, \"temperature\": 0}'": skip("needs the server above running"),
    f"{PY} -m cgpt_jax.serve.loadtest --checkpoint=hf:runs/serve_d256l4 --config=experiments/cerebras_gpt.py:size=111m "
    "--config.model.d_model=256 --config.model.n_layers=4 --config.model.n_heads=4 --config.model.d_ff=1024 "
    "--requests=500 --concurrency=16,64 --cache_len=256 --output=runs/serve_d256l4.json":
        skip("the load test of docs/serving.md, about 25 minutes on this CPU"),
    f"{PY} -m cgpt_jax.quantize --checkpoint=runs/cpu_ladder/d80l2 --scheme=int8 --output=runs/d80l2-int8":
        skip("needs the ladder's d80l2 run; quantized checkpoints are written and loaded in tests/test_quantize.py"),
    f"{PY} -m cgpt_jax.generate --checkpoint=runs/d80l2-int8 '--prompt=def main(' --max_new_tokens=40":
        skip("needs the quantized d80l2 checkpoint; generate loads one in tests/test_quantize.py"),
    f"{PY} -m cgpt_jax.generate --checkpoint=runs/cpu_ladder/d80l2 --quantize=int4:group=16 '--prompt=import '":
        skip("needs the ladder's d80l2 run; quantized generation runs in tests/test_quantize.py"),
    f"{PY} -m cgpt_jax.classify --checkpoint=runs/cls/pretrained --quantize=int8 '--text=async def main(): ...'":
        skip("needs the fine-tuned run; a quantized classifier runs in tests/test_quantize.py"),
    f"HF_DATASETS_OFFLINE=1 {PY} -m cgpt_jax.evaluate --model cgpt_jax --model_args "
    "checkpoint=runs/cpu_ladder/d80l2,quantize=int8 --tasks cgpt_stdlib_bpb --include_path runs/eval_tasks":
        skip("needs the ladder's runs; docs/quantization.md gives its figures"),
    f"{PY} -m cgpt_jax.quantize.bench --shape=111m --batch=1,16": skip("a speed measurement at the 111M shape, "
                                                                      "tens of minutes on this CPU"),
    # docs/cluster_storage.md: buckets and clusters. tests/test_storage.py runs the s3:// paths against a
    # local S3 emulator; gs:// has no emulator that carries Orbax's writes (the doc says why).
    "bash launch/setup.sh cloud": skip("installs the cloud extra into .venv; the test run itself is its check"),
    f"{PY} -m cgpt_jax.train --config=experiments/cerebras_gpt.py:size=tiny --workdir=s3://bucket/runs/tiny":
        skip("needs an S3 bucket; tests/test_storage.py trains on the S3 emulator"),
    f"{PY} -m cgpt_jax.sweep --config=experiments/cpu_ladder.py --workdir=gs://bucket/sweeps/ladder":
        skip("needs a GCS bucket; tests/test_storage.py runs a sweep on the S3 emulator"),
    f"{PY} -m cgpt_jax.train --config=experiments/cerebras_gpt.py:size=tiny --workdir=gs://bucket/runs/tiny "
    "--config.data.cache_dir=gs://bucket/token_stores":
        skip("needs a GCS bucket; tests/test_storage.py builds and reads a token store on the S3 emulator"),
    f"{PY} -m cgpt_jax.generate --checkpoint=s3://bucket/runs/tiny --prompt_ids=1,2,3 --max_new_tokens=20":
        skip("needs an S3 bucket; tests/test_storage.py runs the command on the S3 emulator's run"),
    f"{PY} -m cgpt_jax.finetune --config=experiments/classify.py:task=jsonl:gs://bucket/tasks/topics.jsonl,"
    "init=gs://bucket/runs/d80l2 --workdir=gs://bucket/runs/cls":
        skip("needs a GCS bucket with a trained run; tests/test_storage.py reads task files from the S3 emulator"),
    f"{PY} -m cgpt_jax.classify --checkpoint=gs://bucket/runs/cls --input=gs://bucket/texts.jsonl "
    "--output=gs://bucket/predictions.csv": skip("needs a GCS bucket with a fine-tuned run"),
    f"{PY} -m cgpt_jax.serve --checkpoint=gs://bucket/runs/tiny":
        skip("a server on a GCS bucket's run; tests/test_storage.py loads a bucket's run as the server does"),
    "gcloud storage buckets create gs://my-bucket --location=us-central2": skip("creates a GCS bucket (gcloud)"),
    "bash launch/tpu_pod.sh my-tpu us-central2-b --config=experiments/cerebras_gpt.py:size=1.3b "
    "--workdir=gs://my-bucket/runs/1.3b --config.mesh.data=-1 --config.mesh.fsdp=8": skip("needs a TPU pod and gcloud"),
    "export AWS_ENDPOINT_URL=https://s3.my-site.example AWS_PROFILE=training":
        skip("sets the environment of the sbatch command below"),
    "sbatch --nodes=4 launch/slurm.sbatch --config=experiments/cerebras_gpt.py:size=6.7b --workdir=s3://runs/6.7b":
        skip("needs a SLURM cluster and an S3 store"),
}


def documented_commands() -> list[str]:
    """Every command of every ```bash block, continuation lines joined and comments dropped."""
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append(shlex.join(words))
    return commands


def _run(command: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    if words[0] == PY:
        words[0] = sys.executable  # the interpreter running the tests is the one `.venv/bin/python` names
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device, as for a user
    result = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return result


def _library_info_lines(stderr: str) -> list[str]:
    """absl-format INFO lines from files that are not cgpt_jax's (Orbax, JAX, ...): hidden by default."""
    own_files = {path.name for path in (REPO / "cgpt_jax").rglob("*.py")}
    return [line for line in stderr.splitlines()
            if (m := re.match(r"I\d{4} \S+\s+\d+ (\S+?):\d+\]", line)) and m.group(1) not in own_files]


def test_every_documented_command_is_listed():
    documented = documented_commands()
    assert set(documented) == set(COMMANDS), (
        f"not in COMMANDS: {sorted(set(documented) - set(COMMANDS))}; "
        f"no longer documented: {sorted(set(COMMANDS) - set(documented))}")


def test_train_tiny_then_generate_from_its_relative_path(tmp_path):
    train = _run(f"{PY} -m cgpt_jax.train --config=experiments/cerebras_gpt.py:size=tiny --workdir=runs/tiny",
                 tmp_path, timeout=400)
    assert (tmp_path / "runs/tiny/summary.json").is_file()
    assert "starting from scratch" in train.stderr  # cgpt_jax's own INFO messages are shown
    assert not _library_info_lines(train.stderr), _library_info_lines(train.stderr)

    generate = _run(f"{PY} -m cgpt_jax.generate --checkpoint=runs/tiny --prompt_ids=1,2,3 --max_new_tokens=20",
                    tmp_path, timeout=200)
    ids = generate.stdout.split()
    assert generate.stdout.count("\n") == 1 and ids[:3] == ["1", "2", "3"] and len(ids) == 23  # no EOS: 20 new
    assert generate.stderr.strip() == ""  # the text is not buried under log lines

    # A run without checkpoints: the error names the flag the user gave (the loader is --init_from's).
    (tmp_path / "runs/empty").mkdir()
    (tmp_path / "runs/empty/config.json").write_bytes((tmp_path / "runs/tiny/config.json").read_bytes())
    with pytest.raises(AssertionError, match=r"--checkpoint=\S*runs/empty: no complete checkpoint") as failed:
        _run(f"{PY} -m cgpt_jax.generate --checkpoint=runs/empty --prompt_ids=1", tmp_path, timeout=200)
    assert "--init_from" not in str(failed.value)


LADDER = (f"{PY} -m cgpt_jax.sweep --config=experiments/cpu_ladder.py --workdir=runs/cpu_ladder",
          f"{PY} -m cgpt_jax.analyze runs/cpu_ladder --reference=cerebras")


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, e in COMMANDS.items() if e.slow and c not in LADDER])
def test_slow_documented_command(command, tmp_path):
    _run(command, tmp_path, timeout=900)


@pytest.mark.slow
def test_cpu_ladder_then_analyze(tmp_path):
    for command in LADDER:
        _run(command, tmp_path, timeout=900)
    assert (tmp_path / "runs/cpu_ladder/report.md").is_file()
