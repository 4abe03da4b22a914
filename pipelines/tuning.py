"""A sweep of this project's trainer, and publishing its winner.

    mtl-ray tune --config configs/quick.yaml             # a sweep; the winner is registered as champion
    mtl-ray tune --config configs/quick.yaml --resume    # continue the latest interrupted sweep

``tune.sweep.run_sweep`` sweeps whatever trainer factory it is handed; here the factory is
``TrialTrainer`` (``pipelines.train``'s TorchTrainer on the tasks' data). After the sweep, the best
trial's best checkpoint is copied to ``<sweep dir>/model``, evaluated on the test sets and logged on
the sweep's MLflow parent run (test reports, model card, the pyfunc model, summary), then registered
with the alias ``champion``. With an object-storage ``output_dir`` the checkpoint is read from the
bucket and the model, reports and ``summary.json`` are staged locally and uploaded into the sweep
folder there (``RunFolder``, as a training run's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mtl.config import RunConfig
from pipelines.publish import MODEL_DIR, RunResult, SweepSummary, publish_model, record
from tune.sweep import STAGE_TRIAL, SweepResult, TrialSpec, find_child_runs, run_sweep


@dataclass
class TrialTrainer:
    """The trainer factory for ``run_sweep``: this project's TorchTrainer for one trial's config,
    hyperparameters and callbacks, over ``data`` (every task's splits)."""

    data: dict[str, Any]

    def __call__(self, trial: TrialSpec):
        from pipelines.sharding import train_datasets
        from pipelines.train import build_trainer, make_loop_config

        loop_config = make_loop_config(trial.cfg, self.data, trial.mlflow_run_id, **trial.params)
        return build_trainer(trial.cfg, loop_config, train_datasets(trial.cfg, self.data), run_name=trial.run_name,
                             storage_path=trial.storage_path, callbacks=trial.callbacks,
                             storage_filesystem=trial.storage_filesystem)


def run_tune(cfg: RunConfig, resume: bool = False, data: dict[str, Any] | None = None,
             callbacks: list | None = None) -> RunResult:
    """Data -> sweep -> best checkpoint -> test sets -> MLflow parent run -> registered ``champion``.
    Returns a ``RunResult`` with mode "sweep" (``.sweep`` holds the best trial, the trial table and
    the counts). ``callbacks`` are extra Tune callbacks."""
    from pipelines.data import read_tasks
    from pipelines.ray_utils import check_resources, init_ray, required_cpus
    from tune.sweep import TRIAL_CPUS, concurrency

    t0 = time.time()
    data = data or read_tasks(cfg)  # fails before Ray on bad data
    init_ray(min_cpus=required_cpus(cfg, per_trial=TRIAL_CPUS))
    # concurrent trials' workers + data.cpus must fit, or trials wait forever on their data
    check_resources(cfg, trials=concurrency(cfg), per_trial=TRIAL_CPUS)
    result = run_sweep(cfg, TrialTrainer(data), resume=resume, callbacks=callbacks)
    return publish_sweep(cfg, result, data, t0)


def _card_extra(cfg: RunConfig, result: SweepResult) -> dict[str, Any]:
    best, equal = result.best, result.equal_weights
    card_extra = {"sweep": f"{result.trials} trials ({cfg.tune.search} search, ASHA stopped {result.stopped_early})",
                  "best trial": best["trial_id"], "best validation objective": f"{best['objective']:.4f}",
                  "learning rate": f"{best['lr']:.3g}"}
    for t, w in (best.get("task_weights") or {}).items():
        card_extra[f"loss weight λ {t}"] = f"{w:.3f}"
    if equal:
        card_extra["equal weights (λ = 1) validation objective"] = f"{equal['objective']:.4f}"
    return card_extra


def publish_sweep(cfg: RunConfig, result: SweepResult, data: dict[str, Any], t0: float | None = None
                  ) -> RunResult:
    """The winner of ``result`` through the publishing stage training uses (``publish_model``, then
    ``record``): ``<sweep dir>/model``, test metrics and, with MLflow, the parent run's test reports,
    model card, logged model, registered version and summary. In object storage the checkpoint is
    read from the bucket, and the model, reports and summary.json are uploaded into the sweep folder."""
    from ray.train import Checkpoint

    from mtl import storage
    from pipelines import tracking

    parent, best, folder = result.parent_run_id, result.best, result.folder
    path, fs = storage.ray_storage(result.best_checkpoint)
    try:
        published = publish_model(cfg, Checkpoint(path, filesystem=fs), data, folder.local / MODEL_DIR,
                                  parent, _card_extra(cfg, result), register=bool(parent),
                                  description=f"Best of sweep {folder.name}: trial {best['trial_id']}, "
                                              f"validation objective {best['objective']:.4f}")
        if published.registered_version:
            _tag_version(cfg, result, published.registered_version)
    except BaseException:
        if parent:
            tracking.end_run(parent, "FAILED")
        raise
    winner = result.table.set_index("trial_id").loc[best["trial_id"]]
    sweep = SweepSummary(best=best, best_checkpoint=result.best_checkpoint, trials=result.trials,
                         trials_stopped_early=result.stopped_early, errors=result.errors, max_t=result.max_t,
                         max_concurrent_trials=result.max_concurrent_trials, equal_weights=result.equal_weights,
                         table=result.shown_table())
    model_dir = storage.join(folder.remote, MODEL_DIR) if folder.remote else str(published.model_dir)
    run = record(RunResult(
        mode="sweep", run_dir=folder.where, model_dir=model_dir, mlflow_run_id=parent,
        best_step=best["best_step"], best_objective=best["objective"], steps=None,
        stopped_early=bool(winner.get("patience_stop", False)), samples_per_s=result.best_metrics.get("samples_per_s"),
        wall_s=round(time.time() - t0, 1) if t0 is not None else result.wall_s, fit_s=result.wall_s,
        test_metrics=published.test_metrics, model_uri=published.model_uri,
        registered_version=published.registered_version, calibration=published.calibration, sweep=sweep,
    ), folder.local)
    folder.sync()  # model, reports, summary next to the trials
    return run


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
