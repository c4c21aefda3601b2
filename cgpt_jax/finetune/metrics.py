"""Classification metrics from predicted and true labels (class ids, or multi-label 0/1 indicators), and
the confusion-matrix figure."""
from __future__ import annotations

import io

import numpy as np

from cgpt_jax import storage


def confusion(labels_N: np.ndarray, predictions_N: np.ndarray, num_labels: int) -> np.ndarray:
    """[true, predicted] counts."""
    counts_CxC = np.zeros((num_labels, num_labels), np.int64)
    np.add.at(counts_CxC, (labels_N, predictions_N), 1)
    return counts_CxC


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    numerator = np.asarray(numerator, np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=np.asarray(denominator) > 0)


def _per_class(true_positive_C: np.ndarray, predicted_C: np.ndarray, actual_C: np.ndarray,
               label_names: list[str]) -> tuple[dict, np.ndarray]:
    """({name: precision, recall, F1, support}, F1 [C]); 0 where a class has no predictions or examples."""
    precision_C, recall_C = _ratio(true_positive_C, predicted_C), _ratio(true_positive_C, actual_C)
    f1_C = _ratio(2 * precision_C * recall_C, precision_C + recall_C)
    return ({name: {"precision": float(precision_C[i]), "recall": float(recall_C[i]), "f1": float(f1_C[i]),
                    "support": int(actual_C[i])} for i, name in enumerate(label_names)}, f1_C)


def classification_metrics(labels_N: np.ndarray, predictions_N: np.ndarray, label_names: list[str]) -> dict:
    """accuracy, macro-F1 (the mean of the per-class F1, classes without examples or predictions count
    0), per-class precision/recall/F1/support and the confusion matrix (rows true, columns predicted)."""
    counts_CxC = confusion(labels_N, predictions_N, len(label_names))
    true_positive_C = np.diag(counts_CxC)
    per_class, f1_C = _per_class(true_positive_C, counts_CxC.sum(0), counts_CxC.sum(1), label_names)
    return {
        "accuracy": float(true_positive_C.sum() / max(len(labels_N), 1)),
        "macro_f1": float(f1_C.mean()),
        "per_class": per_class,
        "confusion": counts_CxC.tolist(),
        "examples": int(len(labels_N)),
    }


def multilabel_metrics(labels_NxC: np.ndarray, predictions_NxC: np.ndarray, label_names: list[str]) -> dict:
    """For 0/1 indicators [N, C]: exact_match (every class of a text right; also reported as `accuracy`),
    hamming_accuracy (the share of right text-class decisions), micro-F1 (from the counts summed over
    classes), macro-F1 (the mean per-class F1, 0 for a class without examples or predictions), per-class
    precision/recall/F1/support, and `confusion` [true class, predicted class]: how many texts have the one
    and were given the other (its diagonal: each class's true positives)."""
    true_NxC, predicted_NxC = labels_NxC.astype(bool), predictions_NxC.astype(bool)
    true_positive_C = (true_NxC & predicted_NxC).sum(0)
    predicted_C, actual_C = predicted_NxC.sum(0), true_NxC.sum(0)
    per_class, f1_C = _per_class(true_positive_C, predicted_C, actual_C, label_names)
    micro_f1 = _ratio(2 * true_positive_C.sum(), predicted_C.sum() + actual_C.sum())
    exact_match = float(np.mean(np.all(true_NxC == predicted_NxC, axis=1))) if len(true_NxC) else 0.0
    return {
        "accuracy": exact_match,
        "exact_match": exact_match,
        "hamming_accuracy": float(np.mean(true_NxC == predicted_NxC)) if true_NxC.size else 0.0,
        "micro_f1": float(micro_f1),
        "macro_f1": float(f1_C.mean()),
        "per_class": per_class,
        "confusion": (true_NxC.T.astype(np.int64) @ predicted_NxC.astype(np.int64)).tolist(),
        "examples": int(len(true_NxC)),
    }


def metrics_from_logits(labels: np.ndarray, logits_NxC: np.ndarray, label_names: list[str]) -> dict:
    """The metrics of class logits: of the argmax against class ids [N], or of the classes with a positive
    logit (sigmoid > 0.5) against multi-label indicators [N, C]."""
    if labels.ndim == 2:
        return multilabel_metrics(labels, (logits_NxC > 0).astype(np.int32), label_names)
    return classification_metrics(labels, logits_NxC.argmax(-1), label_names)


def majority_baseline(train_labels: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """The metrics of always predicting the training split's most frequent class (multi-label: each class
    that more than half of the training texts have)."""
    if labels.ndim == 2:
        majority_C = (train_labels.mean(0) > 0.5).astype(np.int32)
        return multilabel_metrics(labels, np.broadcast_to(majority_C, labels.shape), label_names)
    majority = int(np.bincount(train_labels, minlength=len(label_names)).argmax())
    return classification_metrics(labels, np.full_like(labels, majority), label_names)


def plot_confusion(counts: list[list[int]], label_names: list[str], title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts_CxC = np.asarray(counts)
    size = 1.5 + 0.55 * len(label_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(counts_CxC, cmap="Blues")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), n in np.ndenumerate(counts_CxC):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                color="white" if n > counts_CxC.max() / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    image = io.BytesIO()  # rendered in memory, then one write: local, gs:// or s3://
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    storage.write_atomically(path, image.getvalue())
