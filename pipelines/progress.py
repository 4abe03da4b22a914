"""Rank 0's view of training on a worker: MLflow curves and progress lines, as an engine callback.

The driver creates the MLflow run; workers write to it through ``MlflowWriter`` (rank 0 only).
Worker progress goes through logging, not print: Ray Train V2 patches print on workers and tees it
(once to its logger, once to the wrapped stdout), so every printed line reached the driver twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from mtl.engine import Callback, Engine

log = logging.getLogger("mtl.train")


class MlflowWriter:
    """Rank 0's MLflow writer for a run the driver created (no-op without a run id)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.client, self.run_id = None, run_id
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 900])


class ProgressLog(Callback):
    """A training-curve point every ``log_every`` steps and at each evaluation: the mean loss per
    task since the previous point (averaged over workers: every rank takes part), lr and recent
    throughput; at evaluations, the evaluation's metrics. MLflow and log lines on rank 0 only."""

    def __init__(self, tracker: MlflowWriter, log_every: int | None):
        self.tracker, self.log_every = tracker, log_every
        self.window: dict[str, list[float]] = {}
        self.logged: set[str] = set()  # keys of this step's point, not logged again by the evaluation
        self.t0 = self.t_last = time.time()
        self.ex_last = 0

    def on_fit_start(self, engine: Engine) -> None:
        self.t0 = self.t_last = time.time()
        self.ex_last = engine.examples

    def on_step_end(self, engine: Engine, step: int) -> None:
        from mtl.distributed import all_mean

        for t, v in engine.last_losses.items():
            self.window.setdefault(t, []).append(v)
        c = engine.config
        at_eval = step % c.eval_every == 0 or step == c.max_steps
        self.logged = set()
        if not self.log_every or not (step % self.log_every == 0 or at_eval):
            return
        seen = [t for t in engine.names if self.window.get(t)]
        means = all_mean([float(np.mean(self.window[t])) for t in seen], engine.device)
        point = {"lr": engine.scheduler.get_last_lr()[0],
                 "train/samples_per_s": (engine.examples - self.ex_last) / max(time.time() - self.t_last, 1e-9),
                 **{f"train/loss/{t}": v for t, v in zip(seen, means)}}
        if engine.rank == 0:
            self.tracker.log(point, step)
            if not at_eval:
                log.info(f"[train] step {step}/{c.max_steps} loss " + " ".join(f"{t}:{v:.4f}" for t, v in zip(seen, means))
                         + f" | {point['train/samples_per_s']:.1f} samples/s, {time.time() - self.t0:.0f}s")
        self.window, self.logged = {}, set(point)
        self.t_last, self.ex_last = time.time(), engine.examples

    def on_evaluate(self, engine: Engine, step: int, metrics: dict[str, Any]) -> None:
        if engine.rank == 0:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.tracker.log({k: v for k, v in scalars.items() if k not in self.logged}, step)
            val = metrics["validation"]
            log.info(f"[train] step {step}/{engine.config.max_steps} objective {metrics['objective']:.4f} "
                     f"(best {engine.best_objective:.4f} @ {engine.best_step}) "
                     + " ".join(f"{t}:{val[t][engine.kinds[t].primary_metric]:.3f}" for t in engine.names)
                     + f" | {metrics['samples_per_s']:.1f} samples/s, data wait {metrics['data_wait_frac']:.1%}, "
                     f"{time.time() - self.t0:.0f}s")
        self.t_last = time.time()  # throughput counts training steps, not evaluation or checkpoints
