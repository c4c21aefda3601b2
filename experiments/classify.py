"""Fine-tune a pretrained decoder as a text classifier (python -m cgpt_jax.finetune).

    --config=experiments/classify.py:task=stdlib_topics,init=runs/cpu_ladder/d80l2
    --config=experiments/classify.py:task=csv:DIR,init=hf:/path/to/Cerebras-GPT-111M,max_len=256
    --config=experiments/classify.py:init=runs/cpu_ladder/d80l2,scratch=True   (the same model, untrained)

The model (shape, vocabulary, attention) is the backbone's; the task names the data (cgpt_jax/finetune/data.py).
Recipe, as fine-tuning usually goes: peak LR 3e-4 (the CPU ladder pretrained at 3e-3; Cerebras-GPT's
pretraining LRs are 1.2e-4 to 6e-4, so for those use lr=1e-5..3e-5), warmup over the first 6% of the
steps, linear decay to 0, AdamW with weight decay 0.01 on weights and embeddings (not biases or
LayerNorm), clipping at 1.0, nothing frozen. Evaluated on the validation split every `eval_every` steps;
the best state by validation accuracy is kept and scored on the test split.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax.config import base_config, parse_arg

WARMUP_FRACTION = 0.06


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, task="stdlib_topics", init="", scratch=False, loss="softmax", max_len=128, batch=32,
                     steps=420, lr=3e-4, eval_every=60, seed=0)
    config = base_config()
    ft, t = config.finetune, config.train
    ft.task, ft.init, ft.from_scratch, ft.loss = args.task, args.init, args.scratch, args.loss
    t.seq_len, t.global_batch_size, t.steps, t.peak_lr, t.seed = args.max_len, args.batch, args.steps, args.lr, args.seed
    t.warmup_steps = max(1, round(WARMUP_FRACTION * args.steps))
    t.final_lr_fraction = 0.0
    t.weight_decay = 0.01
    t.log_every, t.eval_every = 20, args.eval_every
    config.checkpoint.every_steps = args.eval_every
    return config
