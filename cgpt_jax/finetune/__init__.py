"""Fine-tuning a pretrained decoder for text classification (`python -m cgpt_jax.finetune`).

Reading order: `data.py` (labelled examples → token batches) → `model.py` (the decoder with a `score`
head pooled at each row's last real token) → `objective.py` (the loss `build_run` trains) →
`metrics.py` (accuracy, macro-F1, confusion matrix) → `backbone.py` (the pretrained run or HF directory
it starts from) → `train.py` and `__main__.py` (the command, through `train/loop.py:train_and_evaluate`).
Predictions: `predict.py` (`python -m cgpt_jax.classify`); step speed against pretraining: `speed.py`.
See docs/finetune.md.
"""
