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


def batches_by_length(arrays: dict[str, np.ndarray], batch_size: int, device: torch.device):
    """``arrays``' rows as trimmed ``(ids, mask, labels)`` batches of ``batch_size``, in order of
    length (stable): each batch is trimmed to rows of about its own length rather than to the
    longest of ``batch_size`` rows in their stored order. For passes whose result is a function of
    the rows, not of their order (metrics, calibration events)."""
    order = np.argsort(np.asarray(arrays["attention_mask"]).sum(1), kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield trim(*(torch.as_tensor(arrays[k][rows], device=device) for k in ("input_ids", "attention_mask", "labels")))


def evaluate_arrays(forward, kind: TaskKind, arrays: dict[str, np.ndarray], batch_size: int,
                    device: torch.device, n_batches: int | None = None) -> tuple[list, list]:
    """Run ``forward(ids, mask) -> logits`` over ``arrays`` in batches (``batches_by_length``);
    (predictions, references): the same pairs as in row order, listed in length order (every
    metric is a function of the pairs, not of their order). ``n_batches`` forces that many
    forward calls (empty ones run on a dummy row and are dropped), so every rank of a sharded
    model makes the same collective calls."""
    preds: list = []
    refs: list = []
    calls = 0
    with torch.no_grad():
        for ids, mask, labels in batches_by_length(arrays, batch_size, device):
            p, r = kind.gather(forward(ids, mask), labels)
            preds.extend(p)
            refs.extend(r)
            calls += 1
        for _ in range(calls, n_batches or 0):  # keep collectives in step; the answer is discarded
            ids = torch.zeros((1, 2), dtype=torch.long, device=device)
            forward(ids, torch.ones_like(ids))
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
