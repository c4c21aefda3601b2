"""LoRA in the HF PEFT format: our export loads with peft.PeftModel onto transformers' GPT2LMHeadModel and
GPT2ForSequenceClassification with the same logits, and an adapter made by peft itself imports."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="HF PEFT interop needs torch")
transformers = pytest.importorskip("transformers", reason="HF PEFT interop needs transformers")
peft_hf = pytest.importorskip("peft", reason="HF PEFT interop needs peft")

from cgpt_jax import peft
from cgpt_jax.interop import hf, hf_peft
from cgpt_jax.peft import training

TOLERANCE = 1e-4
VOCAB, POSITIONS = 61, 16
TOKENS = np.random.RandomState(0).randint(0, VOCAB - 1, (2, POSITIONS))


def gpt2_config(**extra):
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=4,
                                   n_inner=64, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, bos_token_id=None, eos_token_id=VOCAB - 1, **extra)


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """A random GPT2LMHeadModel and a GPT2ForSequenceClassification (3 labels) on the same decoder."""
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lm_dir = tmp_path_factory.mktemp("lm")
    lm.save_pretrained(lm_dir)
    cls = transformers.GPT2ForSequenceClassification(gpt2_config(num_labels=3, pad_token_id=VOCAB - 1)).eval()
    cls.transformer.load_state_dict(lm.transformer.state_dict())
    cls_dir = tmp_path_factory.mktemp("cls")
    cls.save_pretrained(cls_dir)
    return lm_dir, cls_dir


def with_random_lora(model, spec: str, seed: int):
    """`model` with `spec` attached and every LoRA parameter (B too) random, so the update is not zero."""
    training.attach(model, peft.build(spec), model.cfg, nnx.Rngs(params=seed))
    rng = np.random.default_rng(seed)
    for _, v in nnx.to_flat_state(nnx.state(model.peft)):
        v[...] = jnp.asarray(0.1 * rng.standard_normal(v.shape), v[...].dtype)
    return model


def test_exported_lora_loads_in_peft_onto_gpt2lmheadmodel(base_dirs, tmp_path):
    lm_dir, _ = base_dirs
    ours = with_random_lora(hf.from_pretrained(lm_dir).model, "lora(rank=4, alpha=8, targets='qkv|out|up|down')", 1)
    hf_peft.save_adapter(ours, tmp_path, base_model_name_or_path=str(lm_dir))
    theirs = peft_hf.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(lm_dir), tmp_path).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(TOKENS)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(TOKENS, jnp.int32)))[..., :VOCAB]
    base = np.asarray(hf.from_pretrained(lm_dir).model(jnp.asarray(TOKENS, jnp.int32)))[..., :VOCAB]
    assert np.abs(got - base).max() > 100 * TOLERANCE  # the adapter changes the logits ...
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)  # ... as PEFT applies it


def test_exported_lora_and_head_load_in_peft_onto_gpt2_sequence_classifier(base_dirs, tmp_path):
    _, cls_dir = base_dirs
    ours = with_random_lora(hf.classifier_from_pretrained(cls_dir).model, "lora(rank=2, alpha=4, targets='qkv|down')", 2)
    ours.score[...] = ours.score[...] + 0.5  # a trained head travels as PEFT's modules_to_save
    hf_peft.save_adapter(ours, tmp_path)
    base = transformers.GPT2ForSequenceClassification.from_pretrained(cls_dir)
    theirs = peft_hf.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(TOKENS)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(TOKENS, jnp.int32), jnp.full((2,), POSITIONS, jnp.int32)))
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_a_lora_adapter_made_by_peft_imports(base_dirs, tmp_path):
    lm_dir, _ = base_dirs
    torch.manual_seed(3)
    config = peft_hf.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                init_lora_weights=False, task_type="CAUSAL_LM")  # B random: a visible update
    theirs = peft_hf.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(lm_dir), config).eval()
    theirs.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = theirs(torch.tensor(TOKENS)).logits.numpy()
    ours, spec = hf_peft.load_adapter(hf.from_pretrained(lm_dir).model, tmp_path)
    assert spec == "lora(rank=4, alpha=16, targets='qkv|out|up|down')"
    got = np.asarray(ours(jnp.asarray(TOKENS, jnp.int32)))[..., :VOCAB]
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    round_trip = tmp_path / "again"
    hf_peft.save_adapter(ours, round_trip)
    again, _ = hf_peft.load_adapter(hf.from_pretrained(lm_dir).model, round_trip)
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again.peft)), nnx.to_flat_state(nnx.state(ours.peft))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


def test_an_adapter_peft_cannot_express_here_is_refused(base_dirs, tmp_path):
    lm_dir, _ = base_dirs
    config = peft_hf.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True)
    peft_hf.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(lm_dir), config).save_pretrained(tmp_path)
    with pytest.raises(hf_peft.AdapterFormatError, match="use_rslora=True"):
        hf_peft.load_adapter(hf.from_pretrained(lm_dir).model, tmp_path)
