"""Evaluation helpers shared by the trainer and the final test pass: batching, metrics, objective."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mtl.tasks import TaskKind


def trim(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None):
    """Drop padding columns every row of the batch has ([B, L] -> [B, L'], L' = longest row)."""
    length = int(mask.sum(1).max().item()) if mask.numel() else 1
    length = max(length, 1)
    if labels is not None and labels.dim() == 2 and labels.shape[1] == ids.shape[1]:
        labels = labels[:, :length]
    return ids[:, :length], mask[:, :length], labels


def objective(metrics: dict[str, dict[str, float]], kinds: dict[str, TaskKind], spec: str = "mean") -> float:
    """``mean`` of each task's primary metric, or one ``<task>.<metric>``."""
    if spec == "mean":
        return float(np.mean([metrics[t][kinds[t].primary_metric] for t in metrics]))
    task, metric = spec.split(".", 1)
    return float(metrics[task][metric])


def flatten_metrics(prefix: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"intent": {"accuracy": .9}} -> {"<prefix>/intent/accuracy": .9}"""
    return {f"{prefix}/{t}/{m}": float(v) for t, d in metrics.items() for m, v in d.items()}


def evaluate_arrays(forward, kind: TaskKind, arrays: dict[str, np.ndarray], batch_size: int,
                    device: torch.device, n_batches: int | None = None) -> tuple[list, list]:
    """Run ``forward(ids, mask) -> logits`` over ``arrays`` in batches; (predictions, references).
    Rows go in order of length (stable), so each batch is trimmed to rows of about its own length
    rather than to the longest of a random ``batch_size``: the same (prediction, reference) pairs,
    listed in that order (every metric is a function of the pairs, not of their order).
    ``n_batches`` forces that many forward calls (empty ones run on a dummy row and are dropped),
    so every rank of a sharded model makes the same collective calls."""
    n = len(arrays["input_ids"])
    order = np.argsort(np.asarray(arrays["attention_mask"]).sum(1), kind="stable") if n else np.zeros(0, np.int64)
    starts = list(range(0, n, batch_size))
    total = max(len(starts), n_batches or 0)
    preds: list = []
    refs: list = []
    for b in range(total):
        if b < len(starts):
            sl = order[starts[b]:starts[b] + batch_size]
            ids, mask, labels = (torch.as_tensor(arrays[k][sl], device=device)
                                 for k in ("input_ids", "attention_mask", "labels"))
            dummy = False
        else:  # keep collectives in step; the answer is discarded
            ids = torch.zeros((1, 2), dtype=torch.long, device=device)
            mask = torch.ones_like(ids)
            labels, dummy = None, True
        ids, mask, labels = trim(ids, mask, labels)
        with torch.no_grad():
            logits = forward(ids, mask)
        if not dummy:
            p, r = kind.gather(logits, labels)
            preds.extend(p)
            refs.extend(r)
    return preds, refs


def evaluate_rows(model, tokenizer, kind: TaskKind, task: str, rows: list[dict[str, Any]], max_length: int,
                  batch_size: int, device: torch.device) -> tuple[list, list]:
    """Predictions and references of ``task`` on raw reader rows (tokenized here, in order)."""
    from mtl.encoding import encode_batch

    arrays = encode_batch(tokenizer, kind, [r["text"] for r in rows], [r["label"] for r in rows], max_length)
    model.eval()
    return evaluate_arrays(lambda i, m: model(i, m, [task])[task], kind, arrays, batch_size, device)


def test_report(model, tokenizer, rows_by_task: dict[str, list[dict[str, Any]]], batch_size: int = 128,
                device: torch.device | None = None) -> dict[str, dict[str, Any]]:
    """Per task: metrics, per-label report and confusion matrix (classification) on the given rows."""
    device = device or next(model.parameters()).device
    out = {}
    for task, rows in rows_by_task.items():
        info, kind = model.tasks[task], model.kinds[task]
        kind.unseen.clear()
        preds, refs = evaluate_rows(model, tokenizer, kind, task, rows, info.max_length, batch_size, device)
        cm = kind.confusion(preds, refs)
        unseen = dict(kind.unseen)
        kind.unseen.clear()
        out[task] = {
            "metrics": kind.metrics(preds, refs),
            "report": kind.report(preds, refs),
            "confusion": cm.tolist() if cm is not None else None,
            "labels": kind.labels,
            "n": len(rows),
            # labels of these rows outside the model's list: skipped, counted (label -> occurrences)
            **({"unseen_labels": unseen} if unseen else {}),
        }
    return out
