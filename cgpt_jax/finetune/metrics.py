"""Classification metrics from predicted and true class ids, and the confusion-matrix figure."""
from __future__ import annotations

import numpy as np


def confusion(labels_N: np.ndarray, predictions_N: np.ndarray, num_labels: int) -> np.ndarray:
    """[true, predicted] counts."""
    counts_CxC = np.zeros((num_labels, num_labels), np.int64)
    np.add.at(counts_CxC, (labels_N, predictions_N), 1)
    return counts_CxC


def classification_metrics(labels_N: np.ndarray, predictions_N: np.ndarray, label_names: list[str]) -> dict:
    """accuracy, macro-F1 (the mean of the per-class F1, classes without examples or predictions count
    0), per-class precision/recall/F1/support and the confusion matrix (rows true, columns predicted)."""
    counts_CxC = confusion(labels_N, predictions_N, len(label_names))
    true_positive_C = np.diag(counts_CxC).astype(np.float64)
    predicted_C, actual_C = counts_CxC.sum(0), counts_CxC.sum(1)
    precision_C = np.divide(true_positive_C, predicted_C, out=np.zeros_like(true_positive_C), where=predicted_C > 0)
    recall_C = np.divide(true_positive_C, actual_C, out=np.zeros_like(true_positive_C), where=actual_C > 0)
    denominator_C = precision_C + recall_C
    f1_C = np.divide(2 * precision_C * recall_C, denominator_C, out=np.zeros_like(denominator_C),
                     where=denominator_C > 0)
    return {
        "accuracy": float(true_positive_C.sum() / max(len(labels_N), 1)),
        "macro_f1": float(f1_C.mean()),
        "per_class": {name: {"precision": float(precision_C[i]), "recall": float(recall_C[i]),
                             "f1": float(f1_C[i]), "support": int(actual_C[i])}
                      for i, name in enumerate(label_names)},
        "confusion": counts_CxC.tolist(),
        "examples": int(len(labels_N)),
    }


def majority_baseline(train_labels_N: np.ndarray, labels_N: np.ndarray, label_names: list[str]) -> dict:
    """The metrics of always predicting the training split's most frequent class."""
    majority = int(np.bincount(train_labels_N, minlength=len(label_names)).argmax())
    return classification_metrics(labels_N, np.full_like(labels_N, majority), label_names)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
