"""HF interop: logit parity with transformers' GPT2LMHeadModel and GPT2ForSequenceClassification, exact round
trips, sharded loading, bad input, fine-tuning from an HF directory."""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

from cgpt_jax.config import base_config
from cgpt_jax.finetune import backbone as backbones
from cgpt_jax.finetune.model import SequenceClassifier
from cgpt_jax.finetune.objective import ClassificationObjective
from cgpt_jax.finetune.train import prepare
from cgpt_jax.infer import Generator
from cgpt_jax.interop import hf
from cgpt_jax.model import GPT, attention
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.parallel.sharding import DEFAULT_RULES, activation_sharding, state_shardings
from tests.helpers import byte_bpe_tokenizer, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# (n_embd, n_head, n_layer, vocab_size, n_positions, n_inner): different widths, heads, depths, vocabularies,
# contexts, and an n_inner that is not 4·d.
SHAPES = {
    "d32h4l2v97s32": (32, 4, 2, 97, 32, None),
    "d48h6l3v256s64": (48, 6, 3, 256, 64, 96),
    "d64h2l1v50s16": (64, 2, 1, 50, 16, 200),
}
TOLERANCE = 1e-4


def random_hf_model(shape: tuple, seed: int = 0):
    """A GPT2LMHeadModel with every parameter random (biases and LayerNorms too), Cerebras-GPT settings."""
    d, h, n_layer, vocab, positions, inner = shape
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=d, n_layer=n_layer, n_head=h,
                                  n_inner=inner, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=None, eos_token_id=vocab - 1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_logits(model, tokens_BxL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BxL)).logits.numpy()


def our_logits(model: GPT, tokens_BxL: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens_BxL, jnp.int32)))[..., :model.cfg.vocab_size]


def params_of(model: GPT) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[pathlib.Path, object]]:
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        model = random_hf_model(shape, seed=i)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(name, hf_dirs):
    path, ref = hf_dirs[name]
    pretrained = hf.from_pretrained(path)
    vocab, positions = SHAPES[name][3], SHAPES[name][4]
    tokens = np.random.RandomState(0).randint(0, vocab, (2, positions))  # the whole context: every wpe row
    delta = np.abs(our_logits(pretrained.model, tokens) - hf_logits(ref, tokens)).max()
    print(f"{name}: max |Δlogit| = {delta:.2e}")
    assert delta <= TOLERANCE

    prompt = tokens[0, :5].tolist()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = Generator(pretrained.model).generate([prompt], max_new_tokens=8, stop_tokens=pretrained.eos_token_ids)
    assert got[0] == expected[0, 5:].tolist()  # the same greedy continuation (through our KV cache)
    assert pretrained.eos_token_ids == (vocab - 1,)
    assert pretrained.config.model.d_ff == (SHAPES[name][5] or 4 * SHAPES[name][0])


def test_torch_bin_and_sharded_indexes_load_the_same_weights(hf_dirs, tmp_path):
    path, ref = hf_dirs["d48h6l3v256s64"]
    expected = params_of(hf.from_pretrained(path).model)
    state = ref.state_dict()

    single_bin = tmp_path / "bin"
    single_bin.mkdir()
    shutil.copy(path / hf.CONFIG_FILE, single_bin)
    torch.save(state, single_bin / hf.TORCH_FILE)

    sharded_safetensors = tmp_path / "sharded_safetensors"
    ref.save_pretrained(sharded_safetensors, max_shard_size="20KB")
    assert (sharded_safetensors / hf.SAFETENSORS_INDEX).is_file()

    sharded_bin = tmp_path / "sharded_bin"
    sharded_bin.mkdir()
    shutil.copy(path / hf.CONFIG_FILE, sharded_bin)
    names = sorted(state)
    weight_map = {}
    for part, chunk in enumerate((names[::2], names[1::2])):
        file = f"pytorch_model-{part + 1:05d}-of-00002.bin"
        torch.save({n: state[n].clone() for n in chunk}, sharded_bin / file)
        weight_map.update({n: file for n in chunk})
    (sharded_bin / hf.TORCH_INDEX).write_text(json.dumps({"weight_map": weight_map}))

    for directory in (single_bin, sharded_safetensors, sharded_bin):
        got = params_of(hf.from_pretrained(directory).model)
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{directory.name}: {key}")


def test_13b_style_gpt2model_config_and_unprefixed_weights(hf_dirs, tmp_path):
    """Cerebras-GPT-13B's config.json says GPT2Model; its weights then carry no 'transformer.' prefix."""
    path, ref = hf_dirs["d32h4l2v97s32"]
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    config.update(architectures=["GPT2Model"], _name_or_path="/cb/home/internal/13b-checkpoint")
    (tmp_path / hf.CONFIG_FILE).write_text(json.dumps(config))
    ref.transformer.save_pretrained(tmp_path / "base")  # a GPT2Model: keys 'wte.weight', 'h.0...'
    shutil.move(tmp_path / "base" / hf.SAFETENSORS_FILE, tmp_path / hf.SAFETENSORS_FILE)
    tokens = np.random.RandomState(1).randint(0, 97, (2, 32))
    delta = np.abs(our_logits(hf.from_pretrained(tmp_path).model, tokens) - hf_logits(ref, tokens)).max()
    assert delta <= TOLERANCE


def test_export_loads_in_transformers_and_round_trip_is_exact(hf_dirs, tmp_path):
    path, ref = hf_dirs["d48h6l3v256s64"]
    tokenizer = make_tokenizer(vocab_size=200)
    first = hf.from_pretrained(path)
    hf.save_pretrained(first.model, tmp_path / "out", tokenizer=tokenizer, eos_token_id=255)

    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    for key, value in ref.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # tied

    second = hf.from_pretrained(tmp_path / "out")
    assert second.config.model.to_dict() == first.config.model.to_dict()
    for key, value in params_of(first.model).items():
        np.testing.assert_array_equal(params_of(second.model)[key], value, err_msg=key)
    assert second.tokenizer.encode("hello world").ids == tokenizer.encode("hello world").ids
    assert second.eos_token_ids == (255,)


def test_bfloat16_import_export_round_trip(hf_dirs, tmp_path):
    path, ref = hf_dirs["d32h4l2v97s32"]
    first = hf.from_pretrained(path, param_dtype="bfloat16")
    hf.save_pretrained(first.model, tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert torch.equal(reloaded.transformer.wte.weight, ref.transformer.wte.weight.bfloat16())
    second = hf.from_pretrained(tmp_path, param_dtype="bfloat16")
    for key, value in params_of(first.model).items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(params_of(second.model)[key], value, err_msg=key)


def test_export_of_a_native_model_with_padded_vocab(tmp_path):
    cfg = tiny_config().model
    cfg.vocab_size, cfg.vocab_pad_multiple = 61, 8
    model = nnx.jit(lambda: GPT(cfg, rngs=nnx.Rngs(3)))()
    hf.save_pretrained(model, tmp_path)
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = np.random.RandomState(2).randint(0, 61, (3, 16))
    assert np.abs(our_logits(model, tokens) - hf_logits(ref, tokens)).max() <= TOLERANCE


def test_sharded_load_gives_each_device_its_shard(hf_dirs, monkeypatch):
    path, ref = hf_dirs["d32h4l2v97s32"]
    reads = []
    original_read = hf._Tensors.read
    monkeypatch.setattr(hf._Tensors, "read", lambda self, name, index: (
        reads.append((name, index)), original_read(self, name, index))[1])
    mesh = make_mesh(tiny_config(data=2, fsdp=2, tensor=2).mesh, jax.devices())
    pretrained = hf.from_pretrained(path, mesh=mesh, vocab_pad_multiple=8)

    graphdef, state = nnx.split(pretrained.model)
    expected = dict(nnx.to_flat_state(state_shardings(state, mesh, DEFAULT_RULES)))
    for key, var in nnx.to_flat_state(state):
        array = var.get_value()
        assert array.sharding == expected[key].get_value(), key
        shard_shape = expected[key].get_value().shard_shape(array.shape)
        assert all(s.data.shape == shard_shape for s in array.addressable_shards), key
    qkv_rows = {index[0].stop - index[0].start for name, index in reads if name == "h.0.attn.c_attn.weight"}
    assert qkv_rows == {16}  # d=32 split over fsdp=2: a device's callback reads only its half of the rows

    @jax.jit
    def forward(state, tokens):
        with activation_sharding(mesh, DEFAULT_RULES):
            return nnx.merge(graphdef, state)(tokens)

    tokens = np.random.RandomState(3).randint(0, 97, (4, 32))
    logits = np.asarray(forward(state, jnp.asarray(tokens, jnp.int32)))[..., :97]
    assert np.abs(logits - hf_logits(ref, tokens)).max() <= TOLERANCE
    assert pretrained.config.mesh.tensor == 2


def make_tokenizer(vocab_size: int):
    return byte_bpe_tokenizer(vocab_size, "hello world, the quick brown fox", repeats=20)


def test_tokenizer_files_are_picked_up(hf_dirs, tmp_path):
    path, _ = hf_dirs["d48h6l3v256s64"]
    shutil.copytree(path, tmp_path / "m")
    tokenizer = make_tokenizer(vocab_size=256)
    tokenizer.model.save(str(tmp_path / "m"))  # vocab.json + merges.txt, as in the Cerebras-GPT repos
    got = hf.from_pretrained(tmp_path / "m").tokenizer
    assert got.decode(got.encode("the quick brown fox").ids) == "the quick brown fox"
    assert got.encode("hello world").ids == tokenizer.encode("hello world").ids

    tokenizer.add_tokens([f"extra{i}" for i in range(256)])
    tokenizer.save(str(tmp_path / "m" / "tokenizer.json"))  # preferred over vocab.json + merges.txt
    with pytest.raises(hf.HFCheckpointError, match="tokenizer.*vocab_size is 256"):
        hf.from_pretrained(tmp_path / "m")


def edit_config(**changes):
    def edit(directory: pathlib.Path) -> None:
        config = json.loads((directory / hf.CONFIG_FILE).read_text())
        config.update(changes)
        (directory / hf.CONFIG_FILE).write_text(json.dumps(config))
    return edit


def replace_weights(transform):
    def edit(directory: pathlib.Path) -> None:
        from safetensors.torch import load_file, save_file

        state = transform(load_file(directory / hf.SAFETENSORS_FILE))
        save_file(state, directory / hf.SAFETENSORS_FILE, metadata={"format": "pt"})
    return edit


def evil_bin(directory: pathlib.Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {directory / 'pwned'}",))

    os.remove(directory / hf.SAFETENSORS_FILE)
    torch.save({"transformer.wte.weight": torch.zeros(97, 32), "payload": Payload()}, directory / hf.TORCH_FILE)


BAD_INPUTS = {
    "no_config": (lambda d: os.remove(d / hf.CONFIG_FILE), "has no config.json"),
    "not_json": (lambda d: (d / hf.CONFIG_FILE).write_text("{oops"), "not valid JSON"),
    "llama": (edit_config(model_type="llama"), "model_type='llama'"),
    "other_architecture": (edit_config(architectures=["GPT2ForSequenceClassification"]), "architectures"),
    "gelu_new": (edit_config(activation_function="gelu_new"), "activation_function='gelu_new'"),
    "untied_config": (edit_config(tie_word_embeddings=False), "tie_word_embeddings=False"),
    "no_weights": (lambda d: os.remove(d / hf.SAFETENSORS_FILE), "has no weights"),
    "shape_mismatch": (edit_config(n_embd=64, n_head=4),
                       r"wte.weight has shape \(97, 32\) but config.json implies \(97, 64\)"),
    "missing_layer": (edit_config(n_layer=3), r"missing tensors: \['h.2"),
    "missing_tensor": (replace_weights(lambda s: {k: v for k, v in s.items() if "ln_f.bias" not in k}),
                       "missing tensors.*ln_f.bias"),
    "untied_head": (replace_weights(lambda s: {**s, "lm_head.weight": torch.zeros_like(s["transformer.wte.weight"])}),
                    "lm_head.weight differs"),
    "extra_tensor": (replace_weights(lambda s: {**s, "transformer.h.0.crossattention.c_attn.weight": torch.zeros(2)}),
                     "not part of a GPT-2"),
    "integer_weights": (replace_weights(lambda s: {**s, "transformer.ln_f.bias": torch.zeros(32, dtype=torch.int32)}),
                        "ln_f.bias has dtype I32"),
    "code_in_bin": (evil_bin, "refusing .*unpickling of code"),
    "garbage_bin": (lambda d: (os.remove(d / hf.SAFETENSORS_FILE), (d / hf.TORCH_FILE).write_bytes(b"garbage")),
                    "pytorch_model.bin"),
    "garbage_safetensors": (lambda d: (d / hf.SAFETENSORS_FILE).write_bytes(b"garbage"), "not a readable safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_a_clear_error(case, hf_dirs, tmp_path):
    path, _ = hf_dirs["d32h4l2v97s32"]
    directory = tmp_path / "m"
    shutil.copytree(path, directory)
    corrupt, message = BAD_INPUTS[case]
    corrupt(directory)
    with pytest.raises(hf.HFCheckpointError, match=message):
        hf.from_pretrained(directory)
    assert not (directory / "pwned").exists()


def test_not_a_directory_and_bad_export_arguments(tmp_path):
    with pytest.raises(hf.HFCheckpointError, match="is not a directory"):
        hf.from_pretrained(tmp_path / "absent")
    cfg = tiny_config().model
    with pytest.raises(hf.HFCheckpointError, match="eos_token_id=64 is outside the vocabulary"):
        hf.save_pretrained(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), tmp_path / "out", eos_token_id=64)
    if "gqa" in attention.registered():
        cfg.attention = "gqa(kv_heads=2)"
        with pytest.raises(hf.HFCheckpointError, match=r"model.attention='gqa\(kv_heads=2\)' has no GPT-2 "):
            hf.save_pretrained(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- GPT2ForSequenceClassification --------------------------------------------------------------------

LABELS = {"d32h4l2v97s32": ["neg", "pos"], "d48h6l3v256s64": ["a", "b", "c"], "d64h2l1v50s16": list("vwxyz")}


@pytest.fixture(scope="module")
def hf_classifier_dirs(tmp_path_factory) -> dict[str, tuple[pathlib.Path, object]]:
    """A random GPT2ForSequenceClassification per shape, padding with the last token id (pad_token_id)."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        lm = random_hf_model(shape, seed=10 + i)
        labels = LABELS[name]
        cfg = transformers.GPT2Config(**{**lm.config.to_dict(), "id2label": dict(enumerate(labels)),
                                         "label2id": {n: j for j, n in enumerate(labels)},
                                         "pad_token_id": shape[3] - 1})
        model = transformers.GPT2ForSequenceClassification(cfg).eval()
        model.transformer.load_state_dict(lm.transformer.state_dict())
        with torch.no_grad():
            model.score.weight.normal_(0.0, 0.5)
        path = tmp_path_factory.mktemp(f"cls_{name}")
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def padded_batch(vocab: int, positions: int, lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of real tokens in [0, vocab - 1) right-padded with vocab - 1, the pad_token_id."""
    rng = np.random.RandomState(seed)
    tokens_BxL = np.full((len(lengths), positions), vocab - 1, np.int64)
    for i, n in enumerate(lengths):
        tokens_BxL[i, :n] = rng.randint(0, vocab - 1, n)
    return tokens_BxL, np.asarray(lengths)


@nnx.jit
def class_logits(model: SequenceClassifier, tokens_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
    return model(tokens_BxL, lengths_B)


def our_class_logits(model: SequenceClassifier, tokens_BxL: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
    return np.asarray(class_logits(model, jnp.asarray(tokens_BxL, jnp.int32), jnp.asarray(lengths_B)))


def hf_class_logits(model, tokens_BxL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BxL)).logits.numpy()


@pytest.mark.parametrize("name", list(SHAPES))
def test_classifier_logits_match_transformers(name, hf_classifier_dirs):
    path, ref = hf_classifier_dirs[name]
    imported = hf.classifier_from_pretrained(path)
    assert imported.label_names == LABELS[name]
    assert imported.pad_token_id == SHAPES[name][3] - 1
    assert imported.config.finetune.num_labels == len(LABELS[name]) and imported.config.finetune.loss == "softmax"
    positions = SHAPES[name][4]
    tokens, lengths = padded_batch(SHAPES[name][3], positions, [positions, 1, positions // 2, 3], seed=5)
    ours = our_class_logits(imported.model, tokens, lengths)
    delta = np.abs(ours - hf_class_logits(ref, tokens)).max()
    print(f"{name}: max |Δ class logit| = {delta:.2e}")
    assert delta <= TOLERANCE


def test_classifier_export_loads_in_transformers_with_the_same_predictions(hf_classifier_dirs, tmp_path):
    path, ref = hf_classifier_dirs["d48h6l3v256s64"]
    first = hf.classifier_from_pretrained(path)
    hf.save_classifier(first.model, tmp_path / "out", label_names=first.label_names, pad_token_id=255,
                       tokenizer=make_tokenizer(vocab_size=200), eos_token_id=255)
    reloaded = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    for key, value in ref.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.config.id2label == {0: "a", 1: "b", 2: "c"} and reloaded.config.pad_token_id == 255
    tokens, lengths = padded_batch(256, 64, [64, 2, 17, 40, 9], seed=6)
    ours = our_class_logits(first.model, tokens, lengths)
    theirs = hf_class_logits(reloaded, tokens)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert np.abs(ours - theirs).max() <= TOLERANCE

    second = hf.classifier_from_pretrained(tmp_path / "out")
    for key, value in params_of(first.model).items():
        np.testing.assert_array_equal(params_of(second.model)[key], value, err_msg=key)
    assert second.label_names == first.label_names and second.tokenizer is not None


def test_native_sigmoid_classifier_exports_as_multi_label(tmp_path):
    cfg = tiny_config().model
    cfg.vocab_size, cfg.vocab_pad_multiple = 61, 8  # padding rows are dropped on export
    model = nnx.jit(lambda: SequenceClassifier(cfg, 3, rngs=nnx.Rngs(4)))()
    hf.save_classifier(model, tmp_path, label_names=["x", "y", "z"], loss="sigmoid", pad_token_id=60)
    ref = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path).eval()
    assert ref.config.problem_type == "multi_label_classification"
    tokens, lengths = padded_batch(61, 16, [16, 5, 1], seed=7)
    ours = our_class_logits(model, tokens, lengths)
    assert np.abs(ours - hf_class_logits(ref, tokens)).max() <= TOLERANCE
    assert hf.classifier_from_pretrained(tmp_path).config.finetune.loss == "sigmoid"
    with pytest.raises(hf.HFCheckpointError, match="architectures \\['GPT2ForSequenceClassification'\\] are not "
                                                   "supported here"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(hf.HFCheckpointError, match="must be 3 distinct names"):
        hf.save_classifier(model, tmp_path / "bad", label_names=["x", "x", "z"])


@pytest.mark.parametrize("kind", ["language_model", "classifier"])
def test_finetune_init_from_an_hf_directory(kind, hf_dirs, hf_classifier_dirs, tmp_path):
    """finetune.init=hf:DIR: the backbone's shape and tokenizer, its weights in place of the seed's; the
    head is fresh from a language model and kept from a classifier with the task's labels."""
    source, _ = (hf_dirs if kind == "language_model" else hf_classifier_dirs)["d48h6l3v256s64"]
    directory = tmp_path / "backbone"
    shutil.copytree(source, directory)
    make_tokenizer(vocab_size=200).save(str(directory / "tokenizer.json"))
    rows = [{"text": f"{word} {i}", "label": "abc"[i % 3]} for i, word in enumerate(["hello", "world", "fox"] * 20)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config()
    config.finetune.task, config.finetune.init = f"jsonl:{tmp_path / 'data.jsonl'}", f"hf:{directory}"
    config.train.seq_len, config.train.global_batch_size = 32, 4
    config, backbone, task, _ = prepare(config, n_devices=1)
    assert config.model.d_model == 48 and task.label_names == ["a", "b", "c"]
    assert backbone.tokenizer.encode("hello fox") == make_tokenizer(vocab_size=200).encode("hello fox").ids

    mesh = make_mesh(config.mesh, jax.devices()[:1])
    objective = ClassificationObjective(3, "softmax")
    seeded = nnx.state(nnx.jit(lambda: objective.make_model(config, nnx.Rngs(params=0)))(), nnx.Param)
    seeded = jax.device_put(seeded, SingleDeviceSharding(jax.devices()[0]))
    abstract = nnx.state(nnx.eval_shape(lambda: objective.make_model(config, nnx.Rngs(0))), nnx.Param)
    name, init = backbones.init_params(backbone, abstract, mesh, list(config.mesh.rules))
    loaded = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(init(seeded))}
    imported = (params_of(hf.from_pretrained(directory).model) if kind == "language_model"
                else params_of(hf.classifier_from_pretrained(directory).model))
    for key, value in imported.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    if kind == "language_model":
        np.testing.assert_array_equal(loaded["score"], np.asarray(seeded["score"].get_value()))
    assert name == str(directory)
