"""Regression: one real value per text, MSE loss, MSE and Pearson correlation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn.functional as F

from mtl.tasks.base import SentenceHead, TaskKind


class Regression(TaskKind):
    name = "regression"
    primary_metric = "pearson"
    metric_names = ("mse", "pearson")
    label_dtype = np.float32

    def __init__(self, labels: list[str] | None = None):
        super().__init__([])

    @property
    def num_outputs(self) -> int:
        return 1

    def build_head(self, hidden, dropout, pooling):
        return SentenceHead(hidden, 1, dropout, pooling)

    def encode_labels(self, raw, word_ids, length):
        return np.asarray([float(r) for r in raw], dtype=np.float32)

    def loss(self, logits, labels):
        return F.mse_loss(logits.float().squeeze(-1), labels.float())

    def gather(self, logits, labels):
        return logits.float().squeeze(-1).tolist(), labels.float().tolist()

    def metrics(self, preds, refs):
        p, r = np.asarray(preds, dtype=float), np.asarray(refs, dtype=float)
        if len(p) == 0:
            return {"mse": 0.0, "pearson": 0.0}
        pearson = 0.0 if p.std() == 0 or r.std() == 0 else float(np.corrcoef(p, r)[0, 1])
        return {"mse": float(((p - r) ** 2).mean()), "pearson": pearson}

    def decode(self, logits, words, spans, word_ids, text, top_k) -> dict[str, Any]:
        return {"value": float(logits.float().reshape(-1)[0])}
