"""Small metric helpers shared by the task kinds (no scikit-learn needed)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(preds: list[int], refs: list[int], n: int) -> np.ndarray:
    """[n, n] counts, rows are references, columns predictions."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (np.asarray(refs, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def per_label_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per label from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(float)
    pred = cm.sum(0).astype(float)
    support = cm.sum(1).astype(float)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=float), where=denom > 0)
