"""The `finetune` section of the config: its fields with defaults, and their validation."""
from __future__ import annotations

import ml_collections

LOSSES = ("softmax", "sigmoid")
BEST_METRICS = ("accuracy", "macro_f1")


def default_finetune_config() -> ml_collections.ConfigDict:
    ft = ml_collections.ConfigDict()
    ft.task = "stdlib_topics"  # 'stdlib_topics' | 'csv:PATH' | 'jsonl:PATH' | 'tfds:NAME' (cgpt_jax/finetune/data.py)
    ft.init = ""  # the backbone: a cgpt_jax run directory, or 'hf:DIR' (a GPT-2-family HF directory)
    ft.from_scratch = False  # True: the backbone's shape and tokenizer, freshly initialised (a baseline)
    ft.text_field = "text"  # CSV column / JSON key of the text
    ft.label_field = "label"  # ... and of the label
    ft.label_names = ""  # 'neg,pos': class ids in this order (then ids are accepted too); '': sorted from train
    ft.val_fraction = 0.1  # a single file is split by a hash of each text into train / validation / test
    ft.test_fraction = 0.1
    ft.loss = "softmax"  # 'softmax' cross-entropy (single-label) | 'sigmoid' binary cross-entropy per class
    ft.best_metric = "accuracy"  # validation metric that picks the best checkpoint: 'accuracy' | 'macro_f1'
    ft.num_labels = -1  # -1: from the data (recorded in the run's config.json)
    ft.length_buckets = True  # pad each training batch to its length bucket (cgpt_jax/finetune/data.py), not max_len
    # What trains (cgpt_jax/peft/, docs/peft.md): 'full' | 'head_only' | 'lora(rank=8, alpha=16,
    # targets='qkv|out|up|down')'; also for language-model fine-tuning (python -m cgpt_jax.train --init_from)
    ft.method = "full"
    return ft


def validate_finetune(ft: ml_collections.ConfigDict) -> list[str]:
    """Errors (field and fix) across the finetune fields; each field's own range is checked by
    cgpt_jax/config.py's RULES."""
    errors = []
    kind, _, arg = ft.task.partition(":")
    if not (ft.task == "stdlib_topics" or (kind in ("csv", "jsonl", "tfds") and arg)):
        errors.append(f"finetune.task={ft.task!r} — use 'stdlib_topics', 'csv:PATH', 'jsonl:PATH' or 'tfds:NAME'.")
    if ft.val_fraction + ft.test_fraction >= 1:
        errors.append(f"finetune.val_fraction={ft.val_fraction} + finetune.test_fraction={ft.test_fraction} "
                      f"leave no training split — make their sum below 1.")
    return errors
