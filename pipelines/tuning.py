"""A sweep of this project's trainer, and publishing its winner.

    mtl-ray tune --config configs/quick.yaml             # a sweep; the winner is registered as champion
    mtl-ray tune --config configs/quick.yaml --resume    # continue the latest interrupted sweep

``tune.sweep.run_sweep`` sweeps whatever trainer factory it is handed; here the factory is
``TrialTrainer`` (``pipelines.train``'s TorchTrainer on the tasks' data). After the sweep, the best
trial's best checkpoint is copied to ``<sweep dir>/model``, evaluated on the test sets and logged on
the sweep's MLflow parent run (test reports, model card, the pyfunc model, summary), then registered
with the alias ``champion``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from mtl.config import RunConfig
from tune.sweep import STAGE_TRIAL, SweepResult, TrialSpec, find_child_runs, run_sweep


@dataclass
class TrialTrainer:
    """The trainer factory for ``run_sweep``: this project's TorchTrainer for one trial's config,
    hyperparameters and callbacks, over ``data`` (every task's splits)."""

    data: dict[str, Any]

    def __call__(self, trial: TrialSpec):
        from pipelines.train import build_trainer, make_loop_config, train_datasets

        loop_config = make_loop_config(trial.cfg, self.data, trial.mlflow_run_id, **trial.params)
        return build_trainer(trial.cfg, loop_config, train_datasets(trial.cfg, self.data), run_name=trial.run_name,
                             storage_path=trial.storage_path, callbacks=trial.callbacks)


def run_tune(cfg: RunConfig, resume: bool = False, data: dict[str, Any] | None = None,
             callbacks: list | None = None) -> dict[str, Any]:
    """Data -> sweep -> best checkpoint -> test sets -> MLflow parent run -> registered ``champion``.

    Returns ``best`` (params and objective), ``test_metrics``, ``model_dir``, ``best_checkpoint``,
    ``model_uri``, ``registered_version``, ``parent_run_id``, ``sweep_dir``, ``table`` (a DataFrame,
    one row per trial), ``wall_s``, ``trials``, ``stopped_early``, ``errors``, and ``equal_weights``
    (with ``tune.compare_equal``, else None). ``callbacks`` are extra Tune callbacks."""
    from pipelines.data import read_tasks
    from pipelines.ray_utils import init_ray

    t0 = time.time()
    data = data or read_tasks(cfg)  # fails before Ray on bad data
    init_ray()
    result = run_sweep(cfg, TrialTrainer(data), resume=resume, callbacks=callbacks)
    return publish_sweep(cfg, result, data, t0)


def publish_sweep(cfg: RunConfig, result: SweepResult, data: dict[str, Any], t0: float | None = None
                  ) -> dict[str, Any]:
    """The winner of ``result``: its model directory, test metrics and (with MLflow) the parent run's
    test reports, model card, logged model and registered version; returns the summary."""
    from ray.train import Checkpoint

    from pipelines import tracking
    from pipelines.publish import publish_model

    parent, best, equal, spec = result.parent_run_id, result.best, result.equal_weights, cfg.tune
    card_extra = {"sweep": f"{result.trials} trials ({spec.search} search, ASHA stopped {result.stopped_early})",
                  "best trial": best["trial_id"], "best validation objective": f"{best['objective']:.4f}",
                  "learning rate": f"{best['lr']:.3g}"}
    for t, w in (best.get("task_weights") or {}).items():
        card_extra[f"loss weight λ {t}"] = f"{w:.3f}"
    if equal:
        card_extra["equal weights (λ = 1) validation objective"] = f"{equal['objective']:.4f}"
    try:
        published = publish_model(cfg, Checkpoint(result.best_checkpoint), data, result.sweep_dir / "model", parent,
                                  card_extra, register=bool(parent),
                                  description=f"Best of sweep {result.sweep_dir.name}: trial {best['trial_id']}, "
                                              f"validation objective {best['objective']:.4f}")
        if published.registered_version:
            _tag_version(cfg, result, published.registered_version)
    except BaseException:
        if parent:
            tracking.end_run(parent, "FAILED")
        raise
    summary: dict[str, Any] = {
        "best": result.best, "test_metrics": published.test_metrics, "calibration": published.calibration,
        "model_dir": str(published.model_dir), "best_checkpoint": result.best_checkpoint,
        "model_uri": published.model_uri, "registered_version": published.registered_version,
        "parent_run_id": result.parent_run_id, "sweep_dir": str(result.sweep_dir), "trials": result.trials,
        "stopped_early": result.stopped_early, "errors": result.errors, "max_t": result.max_t,
        "max_concurrent_trials": result.max_concurrent_trials, "equal_weights": result.equal_weights,
    }
    summary["wall_s"] = round(time.time() - t0, 1) if t0 is not None else result.wall_s
    if parent:
        from mlflow.tracking import MlflowClient

        MlflowClient().log_metric(parent, "wall_s", summary["wall_s"])
        tracking.log_summary(parent, summary)
    (result.sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["table"] = result.shown_table()
    print("[tune] test: " + ", ".join(f"{t} " + " ".join(f"{k}={v:.4f}" for k, v in m.items())
                                      for t, m in summary["test_metrics"].items()), flush=True)
    return summary


def _tag_version(cfg: RunConfig, result: SweepResult, version: str) -> None:
    """The registered version names the winning trial (and its MLflow child run)."""
    from mlflow.tracking import MlflowClient

    client, best = MlflowClient(), result.best
    version_tags = {"mtl_ray.trial_id": best["trial_id"], "mtl_ray.sweep": result.sweep_dir.name,
                    "mtl_ray.validation_objective": f"{best['objective']:.6f}"}
    best_child = find_child_runs(client, result.parent_run_id, best["trial_id"], STAGE_TRIAL)
    if best_child:
        version_tags["mtl_ray.trial_run_id"] = best_child[0].info.run_id
        best["mlflow_run_id"] = best_child[0].info.run_id
    for k, v in version_tags.items():
        client.set_model_version_tag(cfg.mlflow.registered_model, version, k, v)
