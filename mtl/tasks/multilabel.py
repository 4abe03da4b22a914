"""Multi-label classification: any subset of labels per text, BCE loss, micro/macro-F1.

Raw labels are lists of label names (a reader splits ``atis_flight;atis_airfare`` on ``;``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtl.tasks.base import SentenceHead, TaskKind
from mtl.tasks.metrics import f1_from_counts

THRESHOLD = 0.5  # sigmoid probability above which a label is predicted


class MultiLabelClassification(TaskKind):
    name = "multi_label"
    primary_metric = "micro_f1"
    metric_names = ("micro_f1", "macro_f1", "subset_accuracy")
    label_dtype = np.float32

    def build_head(self, hidden, dropout, pooling):
        return SentenceHead(hidden, self.num_outputs, dropout, pooling)

    def encode_labels(self, raw, word_ids, length):
        out = np.zeros((len(raw), self.num_outputs), dtype=np.float32)
        for row, names in enumerate(raw):
            for name in names:
                i = self.label_id(name)  # a name not in the list is left out (and counted)
                if i is not None:
                    out[row, i] = 1.0
        return out

    def loss(self, logits, labels):
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def gather(self, logits, labels):
        pred = (torch.sigmoid(logits.float()) > THRESHOLD).int().tolist()
        return pred, labels.int().tolist()

    def _counts(self, preds, refs):
        p = np.asarray(preds, dtype=bool).reshape(-1, self.num_outputs)
        r = np.asarray(refs, dtype=bool).reshape(-1, self.num_outputs)
        tp = (p & r).sum(0).astype(float)
        fp = (p & ~r).sum(0).astype(float)
        fn = (~p & r).sum(0).astype(float)
        return p, r, tp, fp, fn

    def metrics(self, preds, refs):
        p, r, tp, fp, fn = self._counts(preds, refs)
        present = (tp + fp + fn) > 0
        per_label = f1_from_counts(tp, fp, fn)
        return {
            "micro_f1": float(f1_from_counts(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0]),
            "macro_f1": float(per_label[present].mean()) if present.any() else 0.0,
            "subset_accuracy": float((p == r).all(1).mean()) if len(p) else 0.0,
        }

    def report(self, preds, refs):
        _, _, tp, fp, fn = self._counts(preds, refs)
        f1 = f1_from_counts(tp, fp, fn)
        return {
            label: {
                "precision": float(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else 0.0,
                "recall": float(tp[i] / (tp[i] + fn[i])) if tp[i] + fn[i] else 0.0,
                "f1": float(f1[i]),
                "support": int(tp[i] + fn[i]),
            }
            for i, label in enumerate(self.labels) if tp[i] + fp[i] + fn[i] > 0
        }

    def decode(self, logits, words, spans, word_ids, text, top_k) -> dict[str, Any]:
        probs = torch.sigmoid(logits.float())
        chosen = [
            {"label": self.labels[i], "score": float(probs[i])}
            for i in torch.argsort(probs, descending=True).tolist() if probs[i] > THRESHOLD
        ]
        return {"labels": chosen}
