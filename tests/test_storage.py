"""Run directories on an object store, against a local S3 server (moto) started for this module: a run killed
with SIGKILL resumes exactly from its checkpoints in the bucket and is then read from there by generation and
the Hugging Face / PEFT exports, and a bad bucket, credentials or scheme is refused before anything is
written. (The 2-process run on a bucket is in tests/test_distributed.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cgpt_jax import storage
from cgpt_jax.errors import InputError
from tests.helpers import forget_s3_clients, one_device_env, s3_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLI = ("--config=experiments/cerebras_gpt.py:size=tiny", "--config.model.d_model=32",
            "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.d_ff=64",
            "--config.model.max_seq_len=32", "--config.train.seq_len=32", "--config.train.global_batch_size=8",
            "--config.data.synthetic_vocab_size=64", "--config.train.warmup_steps=5", "--config.train.log_every=1",
            "--config.train.steps=32", "--config.train.eval_every=16", "--config.checkpoint.every_steps=8")
COMPARED = ("loss", "grad_norm", "lr", "eval_loss")


@pytest.fixture(scope="module")
def bucket_env(tmp_path_factory):
    """The emulator's environment for `python -m` subprocesses (it is applied to this process too). The
    subprocess and this process compile the same model: they share a persistent compilation cache."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    cache = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
             "jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in cache}
    for name, value in cache.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    with s3_emulator("bkt") as env:
        yield one_device_env(**env, PYTHONPATH=REPO, **{name.upper(): str(value) for name, value in cache.items()})
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def _train(workdir: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cgpt_jax.train", *TINY_CLI, f"--workdir={workdir}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_here(workdir: str) -> dict:
    """TINY_CLI's run in this process, on one device as the subprocesses."""
    import jax

    from cgpt_jax.train.loop import train_and_evaluate
    from experiments.cerebras_gpt import get_config

    config = get_config(TINY_CLI[0].split(":", 1)[1])
    for flag in TINY_CLI[1:]:
        name, value = flag.removeprefix("--config.").split("=")
        section, field = name.split(".")
        config[section][field] = type(config[section][field])(value)
    return train_and_evaluate(config, workdir, devices=jax.devices()[:1], show_progress=False)


def _curve(workdir: str) -> list[tuple]:
    lines = storage.path(workdir, "metrics.jsonl").read_text().splitlines()
    return [(r["step"], {k: r[k] for k in COMPARED if k in r}) for r in map(json.loads, lines)]


def test_run_on_a_bucket_killed_with_sigkill_resumes_exactly(tmp_path, bucket_env, caplog):
    run = "s3://bkt/run"
    killed = _train(run, bucket_env)
    # Killed once checkpoint 8 is committed and checkpoint 16 has begun: mid-save or just after.
    # Each poll is a request to the server: slowly through start-up, quickly once the saves begin.
    for seen, poll_s in ((storage.path(run, "checkpoints", "8", "commit_success.txt"), 0.25),
                         (storage.path(run, "checkpoints", "16"), 0.02)):
        deadline = time.monotonic() + 180
        while not seen.exists():
            assert killed.poll() is None, killed.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(poll_s)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not storage.path(run, "summary.json").exists()
    assert [s for s, _ in _curve(run)][:8] == list(range(8))  # flushed before checkpoint 8 was saved

    with caplog.at_level("INFO"):
        summary = _train_here(run)  # the same command again (here: in this process)
    assert "resuming from checkpoint s3://bkt/run/checkpoints/" in caplog.text
    reference = _train_here(str(tmp_path / "reference"))  # uninterrupted, on the local disk
    assert _curve(run) == _curve(str(tmp_path / "reference"))  # every step once, bit-identical values
    assert json.loads(storage.path(run, "summary.json").read_text())["final_train_loss"] == \
        summary["final_train_loss"] == reference["final_train_loss"]
    assert storage.path(run, "checkpoints", "32", "commit_success.txt").exists()
    assert storage.path(run, "tensorboard").is_dir() and storage.path(run, "config.json").is_file()
    assert not os.path.exists(os.path.join(REPO, "s3:"))  # the old bug: a local folder named after the URL
    _downstream_reads_the_bucket(run, str(tmp_path / "reference"), bucket_env)


def _downstream_reads_the_bucket(run: str, reference: str, env: dict) -> None:
    """The finished bucket run (equal to `reference` on the local disk) read back by the downstream paths."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cgpt_jax import generate, peft
    from cgpt_jax.interop import hf, hf_peft
    from cgpt_jax.peft import checkpoint as peft_checkpoint
    from cgpt_jax.peft.training import attach

    # The command, on the bucket's run directory: the prompt, then greedy tokens that the local copy's
    # logits choose too (the first one checked here); the same weights, so equal logits.
    cli = subprocess.run([sys.executable, "-m", "cgpt_jax.generate", f"--checkpoint={run}", "--prompt_ids=1,2,3",
                          "--max_new_tokens=4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    ids = [int(t) for t in cli.stdout.split()]
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    from_bucket, from_disk = generate.load(run)[0].model, generate.load(reference)[0].model
    logits = np.asarray(from_disk(tokens))
    assert ids[:3] == [1, 2, 3] and len(ids) == 7 and ids[3] == int(logits[0, -1].argmax())
    np.testing.assert_array_equal(np.asarray(from_bucket(tokens)), logits)

    # A Hugging Face export to the bucket (staged through a local directory) imports back to the same logits.
    hf.save_pretrained(from_bucket, "s3://bkt/hf")
    assert storage.path("s3://bkt/hf", hf.SAFETENSORS_FILE).is_file()
    imported = generate.load("s3://bkt/hf")[0].model
    vocab = from_bucket.cfg.vocab_size
    np.testing.assert_array_equal(np.asarray(imported(tokens))[..., :vocab], logits[..., :vocab])

    # A quantized checkpoint written to the bucket and loaded back: the same integers, so the same logits.
    from cgpt_jax import quantize
    from cgpt_jax.quantize.checkpoint import source_identity

    scheme = quantize.parse("int8")
    quantized = quantize.apply(from_bucket, scheme)
    quantize.save("s3://bkt/int8", quantized, scheme, source=source_identity(run, nnx.state(from_bucket)),
                  rules=generate.load(run)[0].rules)
    assert quantize.is_checkpoint("s3://bkt/int8")
    back = quantize.load("s3://bkt/int8", scheme=scheme)
    assert back.source["checkpoint"] == run
    np.testing.assert_array_equal(np.asarray(back.model(tokens)), np.asarray(quantized(tokens)))

    # LoRA adapters written to and read from the bucket, in both formats, byte for byte.
    spec = "lora(rank=2, alpha=4, targets='qkv')"
    attach(from_bucket, peft.build(spec), from_bucket.cfg, nnx.Rngs(params=1))
    for _, v in nnx.to_flat_state(nnx.state(from_bucket.peft)):
        v[...] = v[...] + 0.1  # B is zero at init: make every tensor distinct from a fresh one
    params = nnx.state(from_bucket, nnx.Param)
    peft_checkpoint.save("s3://bkt/adapter", spec, params, run)
    fresh = nnx.state(attach(generate.load(run)[0].model, peft.build(spec), from_bucket.cfg, nnx.Rngs(params=2)),
                      nnx.Param)
    restored = dict(nnx.to_flat_state(peft_checkpoint.load("s3://bkt/adapter", fresh)))
    for path, value in nnx.to_flat_state(params):
        np.testing.assert_array_equal(np.asarray(restored[path][...]), np.asarray(value[...]))
    hf_peft.save_adapter(from_bucket, "s3://bkt/hf_adapter")
    read_spec, tensors = hf_peft.read_adapter("s3://bkt/hf_adapter")
    assert read_spec == "lora(rank=2, alpha=4.0, targets='qkv')"  # alpha comes back as PEFT stores it: a float
    a_0 = np.asarray(from_bucket.peft.lora.qkv_a[...])[0]
    np.testing.assert_array_equal(tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"],
                                  a_0.reshape(-1, 2).T)


def test_bad_bucket_credentials_and_schemes_are_refused_before_anything_is_written(tmp_path, bucket_env,
                                                                                   monkeypatch):
    from cgpt_jax.train.loop import train_and_evaluate
    from tests.helpers import tiny_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="bucket no-such-bucket does not exist .* create it, or fix the bucket"):
        train_and_evaluate(tiny_config(), "s3://no-such-bucket/run", show_progress=False)
    with pytest.raises(InputError, match=r"no filesystem for 'hdfs://' — use a local path, gs://"):
        storage.check_workdir("hdfs://namenode/run")
    from cgpt_jax import evaluate  # lm-eval reads its task files from the local disk only
    with pytest.raises(InputError, match="task files must be written to a local directory .* give a local path"):
        evaluate._write_tasks(["s3://bkt/tasks"])
    assert not storage.path("s3://bkt/tasks").exists()
    monkeypatch.setitem(storage.REMOTE_SCHEMES, "gs", "no_such_gcs_package")
    with pytest.raises(InputError, match=r"needs the no_such_gcs_package package.*pip install 'cgpt_jax\[cloud\]'"):
        storage.check_workdir("gs://bkt/run")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    forget_s3_clients()
    try:
        with pytest.raises(InputError, match=r"NoCredentialsError.*check the credentials \(AWS_ACCESS_KEY_ID"):
            storage.check_workdir("s3://bkt/run")
    finally:
        forget_s3_clients()
    assert os.listdir(tmp_path) == []


def test_write_atomically_and_move_on_a_bucket(bucket_env):
    target = storage.path("s3://bkt/files/a.json")
    storage.write_atomically(target, '{"a": 1}')
    storage.write_atomically(target, b'{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]  # no temporary left behind
    storage.move("s3://bkt/files", "s3://bkt/moved/files")
    assert not target.exists() and storage.path("s3://bkt/moved/files/a.json").read_bytes() == b'{"a": 2}'


def test_task_and_input_files_are_read_from_a_bucket(bucket_env):
    """Fine-tuning's task files and classify's --input, as the local readers read them (CSV quoting, CRLF)."""
    from cgpt_jax.finetune.data import data_file, read_texts

    storage.path("s3://bkt/texts.csv").write_bytes(b'text,label\r\n"a, b",x\r\n"two\nlines",y\r\n')
    storage.path("s3://bkt/texts.jsonl").write_bytes('{"text": "é"}\n\n{"text": "z"}\n'.encode())
    assert read_texts(data_file("s3://bkt/texts.csv"), "text", "f") == [("a, b", "s3://bkt/texts.csv:2"),
                                                                       ("two\nlines", "s3://bkt/texts.csv:4")]
    assert read_texts(data_file("s3://bkt/texts.jsonl"), "text", "f") == [("é", "s3://bkt/texts.jsonl:1"),
                                                                         ("z", "s3://bkt/texts.jsonl:3")]


def test_sweep_in_a_bucket_runs_resumes_and_is_read_back(bucket_env, tmp_path):
    """The local runner and the analysis's reader over a bucket, with tests/scaling_fixtures/fake_train.py
    (the real trainer's flags, no JAX) as the trainer."""
    from cgpt_jax.scaling import analysis, results, runner
    from cgpt_jax.scaling.experiment import load_experiment

    fixtures = os.path.join(REPO, "tests", "scaling_fixtures")
    spec = tmp_path / "three.py"  # fake_experiment's runs that finish, and the one that dies once
    spec.write_text(f"import sys\nsys.path.insert(0, {fixtures!r})\n"
                    "from fake_experiment import get_config, sweep as all_runs\n\n"
                    "def sweep(arg=None):\n    return [r for r in all_runs(arg) if r['name'] != 'crash']\n")
    experiment = load_experiment(str(spec))
    fake_train = (sys.executable, os.path.join(fixtures, "fake_train.py"))
    workdir = storage.path("s3://bkt/sweep")
    first = runner.run_local(experiment, experiment.runs(), workdir, train_argv=fake_train, progress=False)
    assert first == {"d8": "finished", "d16": "finished", "flaky": "failed"}
    assert "killed at step 5" in json.loads((workdir / "flaky" / runner.FAILURE).read_text())["stderr_tail"]
    second = runner.run_local(experiment, experiment.runs(), workdir, train_argv=fake_train, progress=False)
    assert second == {"d8": "finished", "d16": "finished", "flaky": "finished"}
    assert (workdir / "flaky" / "calls.txt").read_text().count("call") == 2  # resumed; d8, d16 not relaunched
    assert (workdir / "d8" / "calls.txt").read_text().count("call") == 1
    assert "killed at step 5" in (workdir / "flaky" / runner.STDERR_LOG).read_text()  # kept by the 2nd upload

    runs = {r.name: r for r in results.collect_runs("s3://bkt/sweep")}
    assert {name: r.status for name, r in runs.items()} == second
    for name in second:
        assert runs[name].loss == json.loads((workdir / name / "summary.json").read_text())["final_eval_loss"]
    fitted = analysis.analyze("s3://bkt/sweep", n_bootstrap=10)
    assert sorted(r.name for r in fitted.runs if r.usable) == ["d16", "d8", "flaky"]
    # The command writes its report, fit and plot into the bucket.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    analyze = subprocess.run([sys.executable, "-m", "cgpt_jax.analyze", "s3://bkt/sweep", "--n_bootstrap=10"],
                             cwd=cwd, env=bucket_env, capture_output=True, text=True, timeout=120)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    fit = json.loads((workdir / "fit.json").read_text())
    assert fit["fits"][fitted.compute_law.fit.law]["constants"] == pytest.approx(fitted.compute_law.fit.constants,
                                                                                  rel=1e-6)
    assert (workdir / "scaling.png").read_bytes().startswith(b"\x89PNG")
    assert "d16" in (workdir / "report.md").read_text()
    assert not any(cwd.iterdir())  # nothing written to a local folder named after the URL
    with pytest.raises(InputError, match="launch scripts .* written to a local --workdir"):
        runner.write_launch_scripts(experiment, experiment.runs(), workdir, "slurm", runner.LAUNCHERS["slurm"]["opts"])


def test_token_store_in_a_bucket_is_built_once_uploaded_and_read_through_a_checked_copy(bucket_env, tmp_path,
                                                                                         monkeypatch):
    from cgpt_jax.data import store as token_store
    from cgpt_jax.data.prepare import prepare
    from tests.test_data_store import text_config, write_corpus

    monkeypatch.setenv("CGPT_JAX_STORE_MIRROR", str(tmp_path / "mirror"))
    cfg = text_config(write_corpus(tmp_path / "corpus"), "s3://bkt/stores")
    local = prepare(text_config(tmp_path / "corpus", tmp_path / "local"))  # the same store on the local disk
    built = prepare(cfg)
    remote = storage.path("s3://bkt/stores", local.path.name)
    for name in ("train.bin", "validation.bin", "tokenizer.json", token_store.MANIFEST):
        assert (remote / name).read_bytes() == (built.path / name).read_bytes()
    for split in ("train", "validation"):
        assert (built.path / f"{split}.bin").read_bytes() == (local.path / f"{split}.bin").read_bytes()

    # Another host: no local copy yet; it downloads the store and checks it against the manifest.
    monkeypatch.setenv("CGPT_JAX_STORE_MIRROR", str(tmp_path / "host2"))
    again = prepare(cfg)
    assert again.path != built.path and again.manifest == built.manifest
    assert (again.path / "train.bin").read_bytes() == (built.path / "train.bin").read_bytes()
    monkeypatch.setenv("CGPT_JAX_STORE_MIRROR", str(tmp_path / "host3"))
    (remote / "validation.bin").write_bytes(b"\0" * len((remote / "validation.bin").read_bytes()))
    with pytest.raises(token_store.StoreError, match="differs from its manifest's sha256"):
        prepare(cfg)
