"""Token classification with BIO tags: the first subword of each word carries the word's tag, the
other subwords are ignored; entity-level precision/recall/F1 by seqeval; spans with character
offsets when serving."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtl.tasks.base import IGNORE_INDEX, TaskKind, TokenHead


def first_subword_labels(tag_ids: list[int], word_ids: list[int | None]) -> list[int]:
    """Per-token targets: the word's tag on its first subword, IGNORE_INDEX everywhere else."""
    out, previous = [], None
    for wid in word_ids:
        if wid is None or wid == previous:
            out.append(IGNORE_INDEX)
        else:
            out.append(tag_ids[wid])
        previous = wid
    return out


def bio_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities as (type, first word, last word + 1). An I- tag that does not continue an entity
    of its type starts a new one (the lenient reading seqeval also uses)."""
    spans: list[tuple[str, int, int]] = []
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and kind == label
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return spans


class TokenClassification(TaskKind):
    name = "token_classification"
    primary_metric = "f1"
    metric_names = ("precision", "recall", "f1")

    def build_head(self, hidden, dropout, pooling):
        return TokenHead(hidden, self.num_outputs, dropout)

    def encode_labels(self, raw, word_ids, length):
        out = np.full((len(raw), length), IGNORE_INDEX, dtype=np.int64)
        for row, (tags, wids) in enumerate(zip(raw, word_ids)):
            ids = [IGNORE_INDEX if i is None else i for i in map(self.label_id, tags)]  # unseen: skipped
            out[row, : len(wids)] = first_subword_labels(ids, wids)
        return out

    def loss(self, logits, labels):
        return F.cross_entropy(logits.float().reshape(-1, self.num_outputs), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def gather(self, logits, labels):
        pred_ids = logits.argmax(-1)
        preds, refs = [], []
        for p_row, l_row in zip(pred_ids.tolist(), labels.tolist()):
            keep = [i for i, lab in enumerate(l_row) if lab != IGNORE_INDEX]
            preds.append([self.labels[p_row[i]] for i in keep])
            refs.append([self.labels[l_row[i]] for i in keep])
        return preds, refs

    def metrics(self, preds, refs):
        if not refs:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        # seqeval (and scikit-learn under it) is imported where metrics are computed, not in
        # every Ray Data worker that only encodes labels
        from seqeval.metrics import f1_score, precision_score, recall_score

        return {
            "precision": float(precision_score(refs, preds, zero_division=0)),
            "recall": float(recall_score(refs, preds, zero_division=0)),
            "f1": float(f1_score(refs, preds, zero_division=0)),
        }

    def report(self, preds, refs):
        if not refs:
            return {}
        from seqeval.metrics import classification_report

        rep = classification_report(refs, preds, output_dict=True, zero_division=0)
        # the same keys as the other kinds' reports (seqeval says "f1-score")
        return {k: {("f1" if m == "f1-score" else m): (int(v) if m == "support" else float(v)) for m, v in d.items()}
                for k, d in rep.items()}

    def word_tags(self, logits: torch.Tensor, word_ids: list[int | None]) -> tuple[list[str], list[float]]:
        """Tag and probability of each word, read at its first subword ([T, n] logits).

        One tag per word up to the last word that has a token: a word the tokenizer drops entirely
        (a zero-width space, a control character, a lone combining mark) is "O" with probability
        1, so tags stay aligned with words. Words past the truncation cut get no tag."""
        first: dict[int, int] = {}
        for pos, wid in enumerate(word_ids):
            if wid is not None and wid not in first:
                first[wid] = pos
        if not first:
            return [], []
        # one softmax over the first-subword rows only (softmax is row-wise: the same numbers)
        p, i = torch.softmax(logits[list(first.values())].float(), -1).max(-1)
        best = dict(zip(first, zip(i.tolist(), p.tolist())))
        tags, scores = [], []
        for wid in range(max(first) + 1):
            label, prob = best.get(wid, (None, 1.0))
            tags.append("O" if label is None else self.labels[label])
            scores.append(prob)
        return tags, scores

    def decode(self, logits, words, spans, word_ids, text, top_k) -> dict[str, Any]:
        tags, scores = self.word_tags(logits, word_ids)
        entities = []
        for kind, a, b in bio_spans(tags):
            start, end = spans[a][0], spans[b - 1][1]
            entities.append({
                "type": kind, "text": text[start:end], "start": start, "end": end,
                "score": float(np.mean(scores[a:b])),
            })
        return {"entities": entities, "tags": tags}
