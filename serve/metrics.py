"""Per-task metrics of a replica, through Ray Serve's metrics API: exported in Prometheus format
wherever Ray exports metrics (each node's metrics agent, ``ray.nodes()[i]["MetricsExportPort"]``),
with Serve's own tags (application, deployment, replica) added. Ray prefixes the names with
``ray_``; counters end in ``_total``.

- ``mtl_ray_task_requests`` / ``mtl_ray_task_texts`` (counters, per ``task``): what is asked for.
- ``mtl_ray_task_latency_ms`` (histogram, per ``task``): request latency in the replica, from
  arrival to answer (batch wait included), for every task the request asked for.
- ``mtl_ray_task_top_score`` (histogram, per ``task``): the top score of each answer (the label's
  score; multi-label: the best label's; token tasks: each entity's) — a drift signal: a shift
  towards low scores means inputs unlike the training data.
- ``mtl_ray_batch_texts`` / ``mtl_ray_batch_tokens`` (histograms): batch size in texts and in
  tokens actually run through the encoder.
- ``mtl_ray_failed_requests`` (counter, per ``status``): requests refused after the schema
  (a text that broke the pass: 422; the model failing: 500).
"""

from __future__ import annotations

from typing import Any

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
SCORES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
BATCH_TEXTS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BATCH_TOKENS = [16, 64, 256, 1024, 4096, 16384, 65536]


def top_scores(answer: dict[str, Any]) -> list[float]:
    """The scores that say how sure one task's answer is (none for regression)."""
    if "score" in answer:
        return [float(answer["score"])]
    if "labels" in answer:
        return [max((float(x["score"]) for x in answer["labels"]), default=0.0)]
    if "entities" in answer:
        return [float(e["score"]) for e in answer["entities"]]
    return []


class TaskMetrics:
    """The replica's metric objects; ``metrics`` is ``ray.serve.metrics`` (or a stand-in in tests)."""

    def __init__(self, metrics=None):
        if metrics is None:
            from ray.serve import metrics
        task = ("task",)
        self.requests = metrics.Counter("mtl_ray_task_requests", "Requests that asked for the task.", tag_keys=task)
        self.texts = metrics.Counter("mtl_ray_task_texts", "Texts answered for the task.", tag_keys=task)
        self.latency = metrics.Histogram("mtl_ray_task_latency_ms", "Request latency in the replica (ms), "
                                         "per task asked for.", boundaries=LATENCY_MS, tag_keys=task)
        self.score = metrics.Histogram("mtl_ray_task_top_score", "Top score of each answer (drift signal).",
                                       boundaries=SCORES, tag_keys=task)
        self.batch_texts = metrics.Histogram("mtl_ray_batch_texts", "Texts per batch.", boundaries=BATCH_TEXTS)
        self.batch_tokens = metrics.Histogram("mtl_ray_batch_tokens", "Tokens per batch run through the encoder.",
                                              boundaries=BATCH_TOKENS)
        self.failed = metrics.Counter("mtl_ray_failed_requests", "Requests refused after the schema.",
                                      tag_keys=("status",))

    def record_request(self, tasks: list[str], predictions: list[dict[str, Any]], latency_ms: float) -> None:
        for task in tasks:
            tags = {"task": task}
            self.requests.inc(1, tags)
            self.texts.inc(len(predictions), tags)
            self.latency.observe(latency_ms, tags)
            for answer in predictions:
                for s in top_scores(answer[task]):
                    self.score.observe(s, tags)

    def record_batch(self, texts: int, tokens: int) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)

    def record_failure(self, status: int) -> None:
        self.failed.inc(1, {"status": str(status)})
