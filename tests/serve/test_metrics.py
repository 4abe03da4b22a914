"""serve/metrics.py: which values reach which per-task metric (pure logic: a recording stand-in for
ray.serve.metrics; the Prometheus scrape of a real replica is in test_serve_http.py)."""

from __future__ import annotations

from collections import defaultdict

from serve.metrics import TaskMetrics, top_scores


class _Recorder:
    """Stands in for ray.serve.metrics: every Counter/Histogram call lands in ``log``."""

    def __init__(self):
        self.log = defaultdict(list)

    def _metric(self, name, description="", boundaries=None, tag_keys=None):
        log = self.log

        class M:
            def inc(self, value=1.0, tags=None):
                log[name].append((value, tags))

            def observe(self, value, tags=None):
                log[name].append((value, tags))

        return M()

    def Counter(self, name, description="", tag_keys=None):  # noqa: N802 - the API's name
        return self._metric(name, description, None, tag_keys)

    def Histogram(self, name, description="", boundaries=None, tag_keys=None):  # noqa: N802
        return self._metric(name, description, boundaries, tag_keys)


def test_top_scores_per_kind():
    assert top_scores({"label": "a", "score": 0.7}) == [0.7]
    assert top_scores({"labels": [{"label": "p", "score": 0.6}, {"label": "q", "score": 0.9}]}) == [0.9]
    assert top_scores({"labels": []}) == [0.0]
    assert top_scores({"entities": [{"score": 0.5}, {"score": 0.8}], "tags": []}) == [0.5, 0.8]
    assert top_scores({"value": 3.2}) == []


def test_a_request_is_counted_per_task_it_asked_for():
    rec = _Recorder()
    m = TaskMetrics(rec)
    preds = [{"intent": {"label": "a", "score": 0.9}, "slots": {"entities": [{"score": 0.4}], "tags": ["B-X"]}},
             {"intent": {"label": "b", "score": 0.6}, "slots": {"entities": [], "tags": ["O"]}}]
    m.record_request(["intent", "slots"], preds, 12.5)
    m.record_batch(texts=5, tokens=61)
    m.record_failure(422)
    i, s = {"task": "intent"}, {"task": "slots"}
    assert rec.log["mtl_ray_task_requests"] == [(1, i), (1, s)]
    assert rec.log["mtl_ray_task_texts"] == [(2, i), (2, s)]
    assert rec.log["mtl_ray_task_latency_ms"] == [(12.5, i), (12.5, s)]
    assert rec.log["mtl_ray_task_top_score"] == [(0.9, i), (0.6, i), (0.4, s)]
    assert rec.log["mtl_ray_batch_texts"] == [(5, None)] and rec.log["mtl_ray_batch_tokens"] == [(61, None)]
    assert rec.log["mtl_ray_failed_requests"] == [(1, {"status": "422"})]
