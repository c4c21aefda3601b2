"""Generation: incremental decoding equals the full forward pass, batching, sampling, stops, mesh, CLI."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import generate
from cgpt_jax.infer import Generator, Sampling
from cgpt_jax.infer.sampling import filter_logits, greedy as greedy_choice
from cgpt_jax.interop import hf
from cgpt_jax.model import GPT
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train import checkpoint
from cgpt_jax.train.setup import build_run
from tests.helpers import byte_bpe_tokenizer, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
# Different lengths in one prompt bucket (8) and one cache bucket (16 with 6 new tokens): few compilations.
PROMPTS = [[5, 17, 3, 40, 22, 9, 1], [60, 2], [7, 7, 31, 12, 50]]
NEW = 6
SAMPLING = Sampling(temperature=1.0, top_k=20, top_p=0.9)


def model_config():
    cfg = tiny_config().model
    cfg.max_seq_len = 64  # room for several length buckets
    return cfg


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT(model_config(), rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def generator(model) -> Generator:
    return Generator(model, min_bucket=8)


def full_forward_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forward passes over the whole (zero-padded, causal) context."""
    forward = nnx.jit(lambda m, tokens: m(tokens))
    tokens = np.zeros((1, model.cfg.max_seq_len), np.int32)
    tokens[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        tokens[0, i] = int(jnp.argmax(forward(model, jnp.asarray(tokens))[0, i - 1]))
    return tokens[0, len(prompt):len(prompt) + n].tolist()


def test_incremental_logits_equal_full_forward(model, generator):
    """Right-padded prompts of different lengths, then teacher-forced decode steps, against model(tokens).

    Batch 4, prompt bucket 8 and cache 16: the shapes `generate(PROMPTS, max_new_tokens=NEW)` compiles.
    """
    sequences = np.random.RandomState(0).randint(0, VOCAB, (4, 16)).astype(np.int32)
    lengths = np.array([5, 8, 1, 3], np.int32)
    prompts = np.where(np.arange(8) < lengths[:, None], sequences[:, :8], 0).astype(np.int32)
    full = np.asarray(model(jnp.asarray(sequences)))
    seeds = jnp.zeros((4,), jnp.int32)
    _, logits, caches = generator.prefill(generator.state, generator.layers, jnp.asarray(prompts),
                                          jnp.asarray(lengths), seeds, cache_len=16, sampling=Sampling())
    np.testing.assert_allclose(logits, full[np.arange(4), lengths - 1], atol=1e-5)
    for i in range(NEW):
        fed = jnp.asarray(sequences[np.arange(4), lengths + i])
        _, logits, caches = generator.decode(generator.state, generator.layers, caches, fed, jnp.asarray(lengths),
                                             seeds, i, sampling=Sampling())
        np.testing.assert_allclose(logits, full[np.arange(4), lengths + i], atol=1e-5)


def test_greedy_equals_full_forward_and_batched_equals_unbatched(model, generator):
    batched = generator.generate(PROMPTS, max_new_tokens=NEW)
    for prompt, got in zip(PROMPTS, batched):
        assert got == full_forward_greedy(model, prompt, NEW)
        assert generator.generate([prompt], max_new_tokens=NEW) == [got]


def test_sampling_is_seeded_and_per_prompt(generator):
    batched = generator.generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLING, seed=11)
    assert batched == generator.generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLING, seed=11)
    assert batched != generator.generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLING, seed=12)
    for b, prompt in enumerate(PROMPTS):  # prompt b draws with seed + b, whatever else is in the batch
        assert generator.generate([prompt], max_new_tokens=NEW, sampling=SAMPLING, seed=11 + b) == [batched[b]]


def test_filter_logits_top_k_and_top_p():
    """Each row filters with its own settings."""
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]] * 4))
    temperature, top_k, top_p = jnp.array([1.0, 1.0, 1.0, 2.0]), jnp.array([2, 0, 0, 0]), jnp.array([1, 0.8, 0.81, 1])
    filtered = np.asarray(filter_logits(logits, temperature, top_k, top_p))
    assert np.isfinite(filtered).tolist()[:3] == [[True, False, True, False],  # top_k 2
                                                  [True, False, True, False],  # 0.5 + 0.3 reaches 0.8
                                                  [True, False, True, True]]
    np.testing.assert_allclose(filtered[3], logits[3] / 2.0)


def test_new_sampling_settings_compile_nothing(caplog):
    """The settings are traced: after one request, requests of the same shapes with other temperatures,
    top_k and top_p (and greedy) run the same programs."""
    cfg = model_config()
    generator = Generator(GPT(cfg, rngs=nnx.Rngs(0)), min_bucket=8)
    prompts = [[1, 2, 3], [4, 5]]
    generator.generate(prompts, max_new_tokens=3, sampling=Sampling(temperature=0.7, top_k=5))
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for sampling in (Sampling(), Sampling(temperature=1.3, top_p=0.9), Sampling(temperature=0.2, top_k=2)):
            generator.generate(prompts, max_new_tokens=3, sampling=sampling, seed=4)
    assert [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()] == []


def test_greedy_equals_argmax():
    """The greedy choice is jnp.argmax's, ties, NaN and infinities included, at a vocabulary's width."""
    rows = np.random.RandomState(0).randn(4, 50304).astype(np.float32)
    rows[1, [7, 900, 50000]] = 9.0  # a tie: the first id
    rows[2, [30, 40]] = [np.inf, np.nan]  # NaN wins wherever it is, as in argmax
    rows[3] = -np.inf
    edge = np.array([[1, 3, 3, 0], [np.nan, 1, np.nan, 5], [0, np.inf, np.inf, 1]], np.float32)
    for logits in (rows, edge):
        np.testing.assert_array_equal(greedy_choice(jnp.asarray(logits)), np.argmax(logits, axis=-1))


def test_stop_tokens_and_max_new_tokens(generator):
    greedy = generator.generate(PROMPTS, max_new_tokens=NEW)
    stop = greedy[0][2]
    got = generator.generate(PROMPTS, max_new_tokens=NEW, stop_tokens=[stop])
    assert got[0] == greedy[0][:greedy[0].index(stop) + 1]  # ends with the stop token
    for row, full in zip(got[1:], greedy[1:]):
        assert row == (full[:full.index(stop) + 1] if stop in full else full)
    assert [len(r) for r in generator.generate(PROMPTS, max_new_tokens=3)] == [3, 3, 3]


def test_decode_compiles_once_per_bucket(generator):
    before = generator.decode._cache_size(), generator.prefill._cache_size()
    generator.generate([[1, 2, 3]], max_new_tokens=12)  # 12 decode steps, at most one new program each
    after = generator.decode._cache_size(), generator.prefill._cache_size()
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1
    generator.generate([[4, 5, 6, 7, 8]], max_new_tokens=10)  # other lengths, same buckets: nothing new
    assert (generator.decode._cache_size(), generator.prefill._cache_size()) == after


@pytest.fixture(scope="module")
def chunked(model) -> Generator:
    return Generator(model, min_bucket=8, prefill_chunk=16)


def test_warm_up_compiles_every_program_ahead(chunked, caplog):
    """After `warm_up`, prompts of several lengths across prompt and cache buckets (one program up to the
    chunk, chunked beyond) run without compiling anything; a request of another shape compiles."""
    chunked.warm_up(batch_sizes=[3], max_new_tokens=4, prompt_lengths=[3, 40])
    compiled = lambda: [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for length in (1, 4, 33, 60):  # buckets (prompt, cache): (8, 8), then (64, 64) in 4 chunks of 16
            chunked.generate([list(range(1, length + 1))] * 3, max_new_tokens=4)
        warmed = compiled()
        chunked.generate([[1, 2]], max_new_tokens=1)  # batch 1: another prefill program, logged
    assert warmed == []
    assert compiled() != []
    with pytest.raises(ValueError, match=r"prompt_lengths \[61\] must be in \[1, 60\]"):
        chunked.warm_up(batch_sizes=[1], max_new_tokens=4, prompt_lengths=[61])


@pytest.mark.parametrize("attention", ["dense", "sliding_window(window=12)"])
def test_chunked_prefill_equals_the_full_forward(model, chunked, attention):
    """A prompt bucket of 64 in chunks of 16 (the first through the training-pass core, three over the
    cache) gives each prompt's last-position logits of the full forward pass, and its first token."""
    if attention != "dense":
        cfg = model_config()
        cfg.attention = attention
        model = GPT(cfg, rngs=nnx.Rngs(3))
        chunked = Generator(model, min_bucket=8, prefill_chunk=16)
    lengths = np.array([40, 23, 60, 1], np.int32)  # ending in the third, second, fourth and first chunk
    prompts = np.random.RandomState(2).randint(0, VOCAB, (4, 64)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(prompts)))[np.arange(4), lengths - 1]
    next_B, logits, caches = chunked.prefill_prompts(prompts, jnp.asarray(lengths), jnp.zeros(4, jnp.int32),
                                                     cache_len=64, sampling=Sampling())
    np.testing.assert_allclose(logits, full, atol=1e-5)
    np.testing.assert_array_equal(next_B, full.argmax(-1))
    assert caches[0]["k"].shape[2] == 64


def test_generator_holds_each_weight_once(model, generator):
    """The per-layer copies replace the model's stacked layer arrays in what the generator holds."""
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
    assert "blocks" not in generator.state
    assert nbytes((generator.state, generator.layers)) == nbytes(nnx.state(model))


# An HLO instruction with an array output: its size (as dims), opcode, and rest of line (operands, calls=).
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+ = \w+\[([\d,]*)\]\S* ([\w-]+)\((.*)$", re.MULTILINE)
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*?\{$(.*?)^\}$", re.MULTILINE | re.DOTALL)
# Instructions that write their output from another array (a bitcast only reinterprets one).
_COPYING_OPCODES = {"copy", "transpose", "slice", "dynamic-slice", "concatenate", "reshape", "gather"}
# A fusion computes (dot) or updates its operand in place (scatter, dynamic-update-slice), or else copies.
_NOT_COPYING_IN_FUSION = ("dot(", "scatter(", "dynamic-update-slice(")


def copies_of_size(hlo: str, sizes: set[int]) -> list[str]:
    """The instructions of `hlo` that write an array of one of `sizes` elements copied from another."""
    bodies = dict(_HLO_COMPUTATION.findall(hlo))
    found = []
    for dims, opcode, rest in _HLO_INSTRUCTION.findall(hlo):
        if math.prod(int(d) for d in dims.split(",") if d) not in sizes:
            continue
        if opcode == "fusion":
            called = bodies[re.search(r"calls=%([\w.-]+)", rest).group(1)]
            if not any(op in called for op in _NOT_COPYING_IN_FUSION):
                found.append(f"fusion[{dims}]")
        elif opcode in _COPYING_OPCODES:
            found.append(f"{opcode}[{dims}]")
    return found


@pytest.mark.parametrize("attention, rows", [("dense", 1), ("gqa(kv_heads=2)+rope", 1), ("mqa", 1), ("alibi", 2),
                                              ("gqa(kv_heads=2)+sliding_window(window=4)+alibi", 2),
                                              ("mqa+sliding_window(window=4)+alibi", 2)])
@pytest.mark.parametrize("prompts", [1, 3])
def test_decode_step_copies_no_weight_or_cache(attention, rows, prompts):
    """The compiled decode step reads weights and caches where they lie (no instruction writes an array
    the size of a weight matrix, the embedding or a layer's cache), and updates the caches in place. A
    single prompt decodes one row where the attention reads the cache through the CPU kernel, two where
    XLA's path would copy a one-row cache (`decode_rows`)."""
    cfg = model_config()
    cfg.attention = attention
    model = GPT(cfg, rngs=nnx.Rngs(7))
    generator = Generator(model, min_bucket=8)
    batch, cache_len = generator.batch_sizes(prompts)[1], 16
    assert batch == max(rows, 4 if prompts == 3 else 1)
    caches = model.init_layer_caches(batch, cache_len)
    weight_sizes = {x.size for path, x in jax.tree_util.tree_leaves_with_path(generator.layers)
                    if "kernel" in jax.tree_util.keystr(path)}
    weight_sizes |= {model.wte[...].size} | ({model.wpe[...].size} if model.wpe is not None else set())
    cache_sizes = {x.size for cache in caches for x in cache.values()}
    token_B = jnp.zeros((batch,), jnp.int32)
    hlo = generator.decode.lower(generator.state, generator.layers, caches, token_B, token_B + 1, token_B, 0,
                                 sampling=SAMPLING).compile().as_text()
    assert copies_of_size(hlo, weight_sizes | cache_sizes) == []
    aliases = re.search(r"input_output_alias=\{(.*?)\}, entry", hlo).group(1)
    assert aliases.count("may-alias") == 2 * model.cfg.n_layers  # every K and V cache, donated


def test_prefill_runs_the_last_layers_mlp_on_the_last_rows_only():
    """A prefill needs the final hidden state at each prompt's last position only: every layer writes the
    keys and values of all B·T positions, while the last layer's MLP runs on B rows (`last_rows_B`)."""
    cfg = model_config()
    cfg.d_ff = 128  # an output width no other instruction has
    generator = Generator(GPT(cfg, rngs=nnx.Rngs(7)), min_bucket=8)
    batch, prompt_len = 3, 16
    decode_batch = generator.batch_sizes(batch)[1]
    prompts_BxT = jnp.zeros((batch, prompt_len), jnp.int32)
    lengths_D, seeds_D = jnp.full((decode_batch,), 9, jnp.int32), jnp.zeros((decode_batch,), jnp.int32)
    hlo = generator.prefill.lower(generator.state, generator.layers, prompts_BxT, lengths_D, seeds_D, cache_len=16,
                                  sampling=Sampling().traced()).compile().as_text()
    rows = [math.prod(int(d) for d in dims.split(",")[:-1]) for dims, opcode, _ in _HLO_INSTRUCTION.findall(hlo)
            if dims.endswith(",128") and opcode in ("custom-call", "dot", "fusion")]
    assert set(rows) == {batch * prompt_len, batch}
    assert rows.count(batch) * (cfg.n_layers - 1) == rows.count(batch * prompt_len)


def test_copies_of_size_finds_a_copied_weight():
    """The check above sees what the layer-stacked step did: a weight sliced out of a stacked array for
    its matmul, and a sequence-major cache transposed for the score product."""
    x_BxI, stacked_LxIxO = jnp.ones((3, 8)), jnp.ones((2, 8, 24))
    sliced = jax.jit(lambda x, w, i: x @ jax.lax.dynamic_index_in_dim(w, i, keepdims=False))
    assert copies_of_size(sliced.lower(x_BxI, stacked_LxIxO, 1).compile().as_text(), {8 * 24}) != []
    q_BxHxK, cache_BxSxHxK = jnp.ones((3, 4, 8)), jnp.ones((3, 16, 4, 8))
    scores = jax.jit(lambda q, c: jnp.einsum("bhk,bshk->bhs", q, c))
    assert copies_of_size(scores.lower(q_BxHxK, cache_BxSxHxK).compile().as_text(), {3 * 16 * 4 * 8}) != []


def test_prompt_longer_than_context(model, generator):
    long_prompt = list(np.random.RandomState(1).randint(0, VOCAB, 70))
    with pytest.raises(ValueError, match="prompt 0 has 70 tokens.*context is 64.*truncate_prompt=True keeps its "
                                         "last 60 tokens"):
        generator.generate([long_prompt], max_new_tokens=4)
    got = generator.generate([long_prompt], max_new_tokens=4, truncate_prompt=True)
    assert got == generator.generate([long_prompt[-60:]], max_new_tokens=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]], max_new_tokens=2), "prompt 0 is empty"),
    (dict(prompts=[[1, 64]], max_new_tokens=2), r"outside \[0, 64\): \[64\]"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens=0 must be a positive integer"),
    (dict(prompts=[], max_new_tokens=2), "no prompts"),
    (dict(prompts=[[1]], max_new_tokens=2, sampling=Sampling(temperature=-1.0)), "temperature=-1.0"),
    (dict(prompts=[[1]], max_new_tokens=2, sampling=Sampling(temperature=1.0, top_k=65)), "top_k=65"),
    (dict(prompts=[[1]], max_new_tokens=2, sampling=Sampling(temperature=1.0, top_p=0.0)), "top_p=0.0"),
    (dict(prompts=[[1]], max_new_tokens=2, sampling=Sampling(top_k=5)), "need temperature > 0"),
    (dict(prompts=[[1]], max_new_tokens=2, seed=-1), "seed=-1 must be in"),
])
def test_bad_requests(generator, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generator.generate(**kwargs)


def test_mesh_shards_the_cache_by_heads_and_matches_one_device(model, generator):
    mesh = make_mesh(tiny_config(data=2, tensor=4).mesh, jax.devices())
    sharded = Generator(model, mesh=mesh, min_bucket=8)
    assert sharded.batch_shards == 2
    assert sharded.generate(PROMPTS, max_new_tokens=NEW) == generator.generate(PROMPTS, max_new_tokens=NEW)

    prompts = np.zeros((4, 8), np.int32)
    _, _, caches = sharded.prefill(sharded.state, sharded.layers, sharded.place(prompts, ("batch", "length")),
                                   sharded.place(np.ones(4, np.int32), ("batch",)),
                                   sharded.place(np.zeros(4, np.int32), ("batch",)), cache_len=16,
                                   sampling=Sampling())
    assert len(caches) == model.cfg.n_layers
    for array in (a for cache in caches for a in cache.values()):  # [batch, kv_heads, length, head_dim]
        assert array.sharding.spec[1] == "tensor"
        assert array.addressable_shards[0].data.shape == (2, 1, 16, 8)


# --- the command line ---------------------------------------------------------------------------------

def make_tokenizer():
    return byte_bpe_tokenizer(VOCAB, "the cat sat on the mat; the dog ate the hat", repeats=10)


def test_cli_on_an_hf_directory_streams_text(model, generator, tmp_path):
    tokenizer = make_tokenizer()
    eos = tokenizer.token_to_id("<|endoftext|>")
    hf.save_pretrained(model, tmp_path, tokenizer=tokenizer, eos_token_id=eos)
    loaded, mesh = generate.load(str(tmp_path))
    assert loaded.eos_ids == (eos,)
    out = io.StringIO()
    ids = generate.run(loaded, mesh, prompt="the cat", prompt_ids=None, max_new_tokens=6, sampling=Sampling(),
                       seed=0, stop_ids=[], truncate_prompt=False, out=out)
    prompt_ids = tokenizer.encode("the cat").ids
    assert ids == generator.generate([prompt_ids], max_new_tokens=6)[0]
    assert out.getvalue() == "the cat" + tokenizer.decode(ids, skip_special_tokens=False) + "\n"

    result = subprocess.run(
        [sys.executable, "-m", "cgpt_jax.generate", f"--checkpoint={tmp_path}", "--prompt=the cat",
         "--max_new_tokens=6", "--stop_ids=", "--tensor_parallel=2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == out.getvalue()

    with pytest.raises(ValueError, match="no config.json"):
        generate.load(str(tmp_path / "nothing"))


def test_cli_on_a_run_directory(tmp_path):
    config = tiny_config()
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    state = build_run(config, mesh).init_state()
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "data_description": {"source": "synthetic"}}))
    saver = checkpoint.RunCheckpoints(str(tmp_path), config.checkpoint)
    saver.save(3, state, {}, wait=True)
    saver.close()

    loaded, _ = generate.load(str(tmp_path))
    assert loaded.tokenizer is None
    out = io.StringIO()
    ids = generate.run(loaded, None, prompt=None, prompt_ids=[1, 2, 3], max_new_tokens=4, sampling=Sampling(),
                       seed=0, stop_ids=None, truncate_prompt=False, out=out)
    expected = full_forward_greedy(nnx.merge(nnx.graphdef(loaded.model), state.params), [1, 2, 3], 4)
    assert ids == expected
    assert out.getvalue() == "1 2 3 " + " ".join(map(str, ids)) + "\n"
    with pytest.raises(ValueError, match="has no tokenizer.*--prompt_ids"):
        generate.run(loaded, None, prompt="hello", prompt_ids=None, max_new_tokens=2, sampling=Sampling(), seed=0,
                     stop_ids=None, truncate_prompt=False, out=io.StringIO())


def test_decode_time_is_taken_within_each_round(monkeypatch):
    """bench_decode's decode time is the median of each round's t(n) − t(1), not the difference of the two
    medians: a round in which the machine ran slower for both runs cancels out instead of landing on one
    side of the difference."""
    from cgpt_jax.infer import bench_decode

    # Per length: the warm-up run, then three rounds; the second round ran 2 s slower.
    seconds = {1: iter([9.0, 1.0, 3.0, 1.0]), 32: iter([9.0, 2.0, 4.0, 2.5])}
    now = [0.0]
    monkeypatch.setattr(bench_decode.time, "perf_counter", lambda: now[0])

    def run(n: int) -> None:
        now[0] += next(seconds[n])

    times = bench_decode.interleaved_times({"ours": run}, (1, 32), repeats=3)
    assert times == {("ours", 1): [1.0, 3.0, 1.0], ("ours", 32): [2.0, 4.0, 2.5]}
    assert bench_decode.first_and_decode_seconds(times, "ours", 32) == (1.0, 1.0)  # medians apart: 2.5 − 1.0
