"""Zero-shot tasks scored during pretraining (`config.eval.tasks`), with the training state's parameters.

At each evaluation (every `train.eval_every` steps and at the last) the training loop calls `TaskScores`
with the run's graph and current parameters: the offline tasks of `cgpt_jax/eval/tasks.py` named in
`config.eval.tasks` are scored on the run's mesh by one `Scorer`, built at the first call (it compiles
once per length bucket; later calls swap in the new parameters and reuse the programs), and the loop logs
`eval/<task>/<metric>` to metrics.jsonl and TensorBoard.

The documents are the first `config.eval.limit` (0: all) of those `python -m cgpt_jax.evaluate tasks DIR`
writes with its defaults, tokenized once, at set-up, with the run's tokenizer and lm-eval's conventions
(`text.TextTokens`); each task's metrics are computed as lm-eval computes them for its output type. So a
saved checkpoint scored with `python -m cgpt_jax.evaluate --model cgpt_jax --model_args checkpoint=RUN
--tasks T --include_path DIR --limit N --batch_size B` gives the numbers logged at that step.
"""
from __future__ import annotations

import abc
import math
import re
from collections.abc import Sequence

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tokenizers import Tokenizer

from cgpt_jax.errors import InputError
from cgpt_jax.eval.scorer import Scorer, TokenRequest
from cgpt_jax.eval.tasks import heldout_files, parse_task_names, task_docs
from cgpt_jax.eval.text import TextTokens


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)  # lm-eval's `mean` aggregation, summed in the same order


class Task(abc.ABC):
    """One task's token requests, made at set-up, and its metrics from the scorer."""

    def __init__(self, name: str):
        self.name = name
        self.requests: list[TokenRequest] = []  # (context, continuation) requests, if it scores such

    @abc.abstractmethod
    def score(self, scorer: Scorer) -> dict[str, float]:
        """{metric: value} with the scorer's current parameters."""


class MultipleChoice(Task):
    """lm-eval's `multiple_choice`: acc (the most likely choice is the gold one) and acc_norm (the same
    with each log-likelihood divided by its choice's length in characters)."""

    def __init__(self, name: str, docs: list[dict], tokens: TextTokens):
        super().__init__(name)
        self.requests = tokens.requests([(d["context"], choice) for d in docs for choice in d["choices"]])
        self.lengths = [np.array([float(len(choice)) for choice in d["choices"]]) for d in docs]
        self.gold = [d["gold"] for d in docs]

    def score(self, scorer: Scorer) -> dict[str, float]:
        results = scorer.loglikelihood(self.requests)
        acc, acc_norm, start = [], [], 0
        for lengths, gold in zip(self.lengths, self.gold):
            lls = np.array([ll for ll, _ in results[start:start + len(lengths)]])
            start += len(lengths)
            acc.append(1.0 if np.argmax(lls) == gold else 0.0)
            acc_norm.append(1.0 if np.argmax(lls / lengths) == gold else 0.0)
        return {"acc": _mean(acc), "acc_norm": _mean(acc_norm)}


class Loglikelihood(Task):
    """lm-eval's `loglikelihood`: acc (the target is the greedy continuation) and perplexity."""

    def __init__(self, name: str, docs: list[dict], tokens: TextTokens):
        super().__init__(name)
        self.requests = tokens.requests([(d["context"], d["target"]) for d in docs])

    def score(self, scorer: Scorer) -> dict[str, float]:
        results = scorer.loglikelihood(self.requests)
        return {"acc": _mean([float(greedy) for _, greedy in results]),
                "perplexity": math.exp(-_mean([ll for ll, _ in results]))}


class Rolling(Task):
    """lm-eval's `loglikelihood_rolling`: bits per byte, byte and word perplexity of whole documents."""

    def __init__(self, name: str, docs: list[dict], tokens: TextTokens):
        super().__init__(name)
        self.documents = [tokens.encode(d["text"]) for d in docs]
        self.eot_id = tokens.eot_id
        self.n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
        self.n_words = sum(len(re.split(r"\s+", d["text"])) for d in docs)  # lm-eval's word count

    def score(self, scorer: Scorer) -> dict[str, float]:
        total = sum(scorer.loglikelihood_rolling(self.documents, self.eot_id))
        return {"bits_per_byte": -total / self.n_bytes / math.log(2),
                "byte_perplexity": math.exp(-total / self.n_bytes),
                "word_perplexity": math.exp(-total / self.n_words)}


TASK_KINDS: dict[str, type[Task]] = {"cgpt_stdlib_nextline": MultipleChoice, "cgpt_stdlib_lastident": Loglikelihood,
                                     "cgpt_stdlib_bpb": Rolling}


class TaskScores:
    """The tasks of `eval_config.tasks`, ready to score a run's parameters; see the module docstring.

    Every check (task names, tokenizer) happens here, before the run compiles or writes anything.
    `files` replaces the held-out standard library (for tests)."""

    def __init__(self, eval_config: ml_collections.ConfigDict, *, tokenizer: Tokenizer | None,
                 eos_ids: Sequence[int], model: ml_collections.ConfigDict, mesh: Mesh, rules: Sequence,
                 files: Sequence[tuple[str, str]] | None = None):
        names = parse_task_names(eval_config.tasks)
        tokens = TextTokens(tokenizer, eos_ids, model.vocab_size)
        docs = task_docs(heldout_files() if files is None else files)
        limit = eval_config.limit or None
        self.tasks = [TASK_KINDS[name](name, docs[name][:limit], tokens) for name in names]
        for task in self.tasks:
            longest = max((len(continuation) for _, continuation in task.requests), default=0)
            if longest > model.max_seq_len:
                raise InputError(f"eval.tasks: {task.name} has a continuation of {longest} tokens but the model has "
                                 f"model.max_seq_len={model.max_seq_len} positions — raise max_seq_len or leave "
                                 f"{task.name} out")
        self.batch_size = eval_config.batch_size
        self.mesh = mesh
        self.rules = rules
        self.scorer: Scorer | None = None

    def __call__(self, graphdef: nnx.GraphDef, params: nnx.State) -> dict[str, float]:
        """{'eval/<task>/<metric>': value} for the GPT `graphdef` with `params`."""
        if self.scorer is None:
            self.scorer = Scorer(nnx.merge(graphdef, params), mesh=self.mesh, rules=self.rules,
                                 batch_size=self.batch_size)
        else:
            self.scorer.use_params(params)
        return {f"eval/{task.name}/{metric}": value
                for task in self.tasks for metric, value in task.score(self.scorer).items()}
