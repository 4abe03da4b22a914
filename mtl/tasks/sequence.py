"""Single-label sequence classification: one label per text, cross-entropy, accuracy and macro-F1."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtl.tasks.base import IGNORE_INDEX, SentenceHead, TaskKind
from mtl.tasks.metrics import confusion_matrix, per_label_prf


class SequenceClassification(TaskKind):
    name = "sequence_classification"
    primary_metric = "accuracy"
    metric_names = ("accuracy", "macro_f1")

    def build_head(self, hidden, dropout, pooling):
        return SentenceHead(hidden, self.num_outputs, dropout, pooling)

    def encode_labels(self, raw, word_ids, length):
        ids = (self.label_id(r) for r in raw)
        return np.asarray([IGNORE_INDEX if i is None else i for i in ids], dtype=np.int64)

    def loss(self, logits, labels):
        if not bool((labels != IGNORE_INDEX).any()):  # every row's label unseen: no signal, not NaN
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def gather(self, logits, labels):
        keep = labels != IGNORE_INDEX  # rows whose label is not in the list are skipped
        return logits.argmax(-1)[keep].tolist(), labels[keep].tolist()

    def metrics(self, preds, refs):
        cm = confusion_matrix(preds, refs, self.num_outputs)
        _, _, f1, support = per_label_prf(cm)
        present = (support > 0) | (cm.sum(0) > 0)
        return {
            "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        }

    def report(self, preds, refs):
        cm = confusion_matrix(preds, refs, self.num_outputs)
        p, r, f1, s = per_label_prf(cm)
        return {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(s[i])}
            for i, label in enumerate(self.labels) if s[i] > 0 or cm[:, i].sum() > 0
        }

    def confusion(self, preds, refs):
        return confusion_matrix(preds, refs, self.num_outputs)

    def decode(self, logits, words, spans, word_ids, text, top_k) -> dict[str, Any]:
        probs = torch.softmax(logits.float(), -1)
        k = max(1, min(top_k, self.num_outputs))
        scores, idx = probs.topk(k)
        out: dict[str, Any] = {"label": self.labels[int(idx[0])], "score": float(scores[0])}
        if top_k > 1:
            out["top_k"] = [{"label": self.labels[int(i)], "score": float(s)} for s, i in zip(scores, idx)]
        return out
