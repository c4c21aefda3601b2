"""Fine-tuning a pretrained decoder for text classification (`python -m cgpt_jax.finetune`).

Reading order: `data.py` (labelled examples → token batches) → `model.py` (the decoder with a `score`
head pooled at each row's last real token) → `objective.py` (the loss `build_run` trains) →
`metrics.py` (accuracy, macro-F1, confusion matrix) → `backbone.py` (the pretrained run or HF directory
it starts from) → `__main__.py` (the command, through `train/loop.py:train_and_evaluate`).
Predictions: `python -m cgpt_jax.classify`. See docs/finetune.md.
"""
