"""config.finetune.method: bad input refused at config time (virtual tokens' count, slot and context included), and language-model fine-tuning with LoRA
through the training loop's --init_from (its adapter directory included)."""
import jax
import numpy as np
import pytest
from flax import nnx

from cgpt_jax.config import validate
from cgpt_jax.errors import InputError
from cgpt_jax.generate import load_run
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.peft import checkpoint as peft_checkpoint
from cgpt_jax.train import checkpoint
from cgpt_jax.train.loop import train_and_evaluate
from cgpt_jax.train.setup import build_run
from tests.helpers import tiny_config


@pytest.mark.parametrize("method, message", [
    ("lora(targets='qkv|values')", r"\['values'\] match no kernel; the targets are \['qkv', 'out', 'up', 'down'\]"),
    ("lora(rank=0)", "rank=0 must be a positive integer"),
    ("lora(rank=40)", r"rank=40 is larger than the qkv kernel's smaller side \(32x96\); use a rank of at most 32"),
    ("lora(rank=", r"does not parse.*\n.*registered PEFT methods.*\n(?s:.*)lora\(rank=8, alpha=16"),
    ("lorra(rank=4)", r"unknown PEFT method 'lorra'.*\n.*registered PEFT methods(?s:.*)head_only"),
    ("lora(rnak=4)", r"PEFT method 'lora' has no argument\(s\) \['rnak'\]"),
    ("full+head_only", r"'full' and 'head_only' both claim the model's 'base'"),
    ("lora+lora(rank=2)", r"'lora' and 'lora' both claim the model's 'kernels'"),
    ("prompt(tokens=0)", "tokens=0 must be a positive integer"),
    ("prefix(tokens=2.5)", "tokens=2.5 must be a positive integer"),
    ("prompt(tokens=2)+prompt", r"'prompt' and 'prompt' both claim the model's 'positions'"),
    ("prompt(tokens=2)+prefix(tokens=2)", r"'prompt' and 'prefix' both claim the model's 'positions'"),
    ("prefix(tokens=2)", (r"puts 2 virtual tokens before every sequence, so train.seq_len=16 needs 18 positions "
                          r"but model.max_seq_len=16 — use train.seq_len <= 14")),
])
def test_bad_method_is_refused_at_config_time(method, message):
    config = tiny_config()
    config.finetune.method = method
    with pytest.raises(InputError, match=message):
        validate(config, 1)


def test_targets_an_attention_variant_lacks_are_refused():
    config = tiny_config()
    config.model.attention = "gqa(kv_heads=2)"  # separate q and kv kernels: no fused qkv kernel
    config.finetune.method = "lora(targets='qkv|up')"
    with pytest.raises(InputError, match=r"'qkv' matches no parameter of attention 'gqa\(kv_heads=2\)'"):
        validate(config, 1)


def test_head_only_on_a_language_model_trains_nothing_and_is_refused():
    config = tiny_config()
    config.finetune.method = "head_only"
    with pytest.raises(InputError, match="trains no parameter of this model"):
        build_run(config, make_mesh(config.mesh, jax.devices()[:1]))


def test_language_model_lora_from_init_from_trains_only_the_adapter(tmp_path):
    source = tiny_config()  # a base checkpoint: the seed's parameters, saved as the loop saves them
    run = build_run(source, make_mesh(source.mesh, jax.devices()[:1]))
    saved = checkpoint.RunCheckpoints(str(tmp_path / "source"), source.checkpoint)
    saved.save(1, run.init_state(), {}, wait=True)
    saved.close()
    tuned = tiny_config()
    tuned.train.steps, tuned.train.peak_lr, tuned.checkpoint.every_steps = 3, 1e-2, 3
    tuned.finetune.method = "lora(rank=2, alpha=4, targets='qkv|down')"
    summary = train_and_evaluate(tuned, str(tmp_path / "tuned"), init_from=str(tmp_path / "source"),
                                 show_progress=False)
    assert summary["status"] == "finished"

    def fingerprints(run_dir, config) -> dict[str, int]:  # per-tensor bit sums, saved with the checkpoint
        abstract = build_run(config, make_mesh(config.mesh, jax.devices()[:1])).abstract_state.params
        found = checkpoint.find_init_source(str(run_dir), checkpoint.tensor_specs(abstract, "params/"))
        return {name.removeprefix("params/"): value for name, value in found.fingerprint.items()}

    base, after = fingerprints(tmp_path / "source", source), fingerprints(tmp_path / "tuned", tuned)
    assert {k for k in after if k not in base} == {f"peft/lora/{t}_{x}" for t in ("qkv", "down") for x in "ab"}
    assert {k: after[k] for k in base} == base  # the base as the source left it, bit for bit
    assert after["peft/lora/qkv_b"] != 0  # B started at zero and trained
    loaded = load_run(tmp_path / "tuned", None)  # what python -m cgpt_jax.generate decodes with
    assert loaded.model.peft.lora.targets == ("qkv", "down")

    # DIR/adapter: the trained LoRA tensors alone (the last checkpoint's values), onto the source's base only.
    adapter = str(tmp_path / "tuned" / "adapter")
    assert summary["adapter"] == {"directory": "adapter", "tensors": 4}
    final = nnx.to_flat_state(nnx.state(loaded.model, nnx.Param))
    fresh = nnx.from_flat_state([(p, v.replace(np.zeros(v.shape, v[...].dtype)) if p[0] == "peft" else v)
                                 for p, v in final])
    for (path, got), (_, want) in zip(nnx.to_flat_state(peft_checkpoint.load(adapter, fresh)), final, strict=True):
        np.testing.assert_array_equal(got[...], want[...], err_msg=str(path))
    other = nnx.from_flat_state([(p, v.replace(v[...] + 1e-3) if p == ("wte",) else v) for p, v in final])
    with pytest.raises(peft_checkpoint.AdapterError, match=f"trained on the base {tmp_path / 'source'}"):
        peft_checkpoint.load(adapter, other)
