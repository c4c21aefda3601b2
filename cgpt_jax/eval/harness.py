"""cgpt_jax as an lm-evaluation-harness model: `--model cgpt_jax`, registered when this module is imported.

    --model_args checkpoint=RUN_DIR        # a training run's newest complete checkpoint
    --model_args hf=PATH                   # a Hugging Face GPT-2 / Cerebras-GPT directory
    [,tensor_parallel=N]                   # split heads, MLP and vocabulary over N devices
    [,quantize=int8|int4|int4:group=G]     # weight-only quantized weights (cgpt_jax/quantize)

A quantized checkpoint directory (`python -m cgpt_jax.quantize`) is given as checkpoint=DIR.

lm-eval's `--batch_size N` is the number of rows per scoring batch. Each request type is served by
`cgpt_jax.eval.text.TextModel`, which follows lm-eval's tokenization conventions.
"""
from __future__ import annotations

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from cgpt_jax import cli
from cgpt_jax.errors import InputError
from cgpt_jax.eval.text import TextModel
from cgpt_jax.generate import load
from cgpt_jax.train.checkpoint import CheckpointError

MODEL_NAME = "cgpt_jax"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until tasks that do not set one


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return 1
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--batch_size={value}: cgpt_jax takes a number of rows per batch, not "
                         f"'auto' — give e.g. --batch_size 32") from None


@register_model(MODEL_NAME)
class CgptJaxLM(LM):
    def __init__(self, checkpoint: str | None = None, hf: str | None = None, tensor_parallel: int | str = 1,
                 quantize: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, device: str | None = None):
        """`max_batch_size` and `device` are lm-eval's torch-backend settings, which it passes to every
        model: JAX places the model on its own devices (`tensor_parallel=N` splits it over N)."""
        super().__init__()
        if (checkpoint is None) == (hf is None):
            raise InputError("--model_args needs exactly one of checkpoint=RUN_DIR (a training run) and "
                             "hf=PATH (a Hugging Face model directory)")
        path = cli.resolve_path(str(checkpoint if checkpoint is not None else hf))
        try:
            loaded, mesh = load(path, int(tensor_parallel), None if quantize is None else str(quantize))
        except (ValueError, CheckpointError) as e:
            raise InputError(str(e)) from e
        self.model = TextModel(loaded, mesh, batch_size=_batch_size(batch_size), progress=True)

    @property
    def tokenizer_name(self) -> str:
        return f"cgpt_jax-{self.model.tokenizer.get_vocab_size(with_added_tokens=True)}"

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        return self.model.loglikelihood([request.args for request in requests])

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        return self.model.loglikelihood_rolling([request.args[0] for request in requests])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        eos = self.model.decode([self.model.eot_id])
        jobs = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise InputError(f"generation settings {gen_kwargs}: cgpt_jax's lm-eval model decodes greedily "
                                 f"— drop do_sample / temperature from the task's generation_kwargs")
            jobs.append((context, handle_stop_sequences(kwargs.get("until"), eos=eos), kwargs["max_gen_toks"]))
        return self.model.generate_until(jobs)
