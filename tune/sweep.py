"""The Ray Tune sweep: learning rate and per-task loss weights over the same multi-task trainer.

    mtl-ray tune --config configs/quick.yaml             # a sweep; the winner is registered as champion
    mtl-ray tune --config configs/quick.yaml --resume    # continue the latest interrupted sweep

Each trial is a function trainable that builds and fits a ``TorchTrainer`` (``pipelines.train``)
with ``TuneReportCallback``, so every validation of the training loop is one Tune iteration and
ASHA can stop weak trials after ``grace_period`` evaluations. Trials are compared on the unweighted
validation ``objective`` (the loss weights change the loss's scale, not the objective's).

MLflow: one parent run for the sweep (``mtl_ray.stage=sweep``) and one child run per trial
(``mtl_ray.stage=trial``, ``mlflow.parentRunId``) holding the trial's parameters and, logged by
rank 0 of its training workers, the per-task curves. The trial closes its own run when its fit ends;
a trial that ASHA stops is killed mid-fit, so a driver-side Tune callback closes its run (KILLED),
and the driver closes anything still open after ``fit``. After the sweep, the best trial's best
checkpoint is copied to ``<sweep dir>/model``, evaluated on the test sets and logged on the parent
(summary table CSV, plot, best params, test reports, model card, the pyfunc model), then registered
with the alias ``champion``.

Outputs go under ``output_dir/name/sweep-<time>/``: ``trials/`` (Tune's experiment, restorable),
``train/`` (each trial's Ray Train run and checkpoints), ``starts/`` (one marker per trial start),
``model/``, ``sweep_table.csv``, ``sweep.png``, ``summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mtl.config import RunConfig, TuneSpec
from tune.space import (
    OPTIONAL,
    check_space,
    derive_max_concurrent,
    equal_weights_config,
    max_t,
    search_space,
    trial_params,
)

METRIC, MODE = "objective", "max"
TRIAL_CPUS = 0.5  # the trial process only drives its fit (Train's controller asks for 0 CPUs)
EXPERIMENT = "trials"  # Tune's experiment folder inside the sweep dir
EQUAL_EXPERIMENT = "equal"  # the optional equal-weights trial
STAGE_SWEEP, STAGE_TRIAL, STAGE_EQUAL = "sweep", "trial", "equal_weights"
TAG_STAGE, TAG_TRIAL = "mtl_ray.stage", "mtl_ray.trial_id"


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (Ctrl-C); ``--resume`` continues it."""


# ---------------------------------------------------------------------------- trial side


def _mark_start(sweep_dir: str, trial_id: str) -> int:
    """Write ``starts/<trial id>/<n>`` for this start of the trial; returns n (1 for the first)."""
    d = Path(sweep_dir) / "starts" / trial_id
    d.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            fd = os.open(d / str(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            n += 1
            continue
        os.write(fd, f"{time.time():.3f} pid {os.getpid()}\n".encode())
        os.close(fd)
        return n


def find_child_runs(client, parent_run_id: str, trial_id: str | None = None, stage: str | None = None):
    """The (active) child runs of ``parent_run_id``, optionally of one trial or one stage."""
    parent = client.get_run(parent_run_id)
    filt = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'"]
    if trial_id:
        filt.append(f"tags.`{TAG_TRIAL}` = '{trial_id}'")
    if stage:
        filt.append(f"tags.`{TAG_STAGE}` = '{stage}'")
    return client.search_runs([parent.info.experiment_id], filter_string=" and ".join(filt), max_results=10000)


def _child_run(cfg: RunConfig, parent_run_id: str, trial_id: str, run_name: str, params: dict[str, Any],
               attempt: int, stage: str) -> str:
    """The trial's MLflow child run. A restarted trial (after an interrupted sweep) starts over, so
    the earlier attempt's run is deleted and a fresh one holds this attempt's curves."""
    from mlflow.tracking import MlflowClient

    from pipelines import tracking

    tracking.setup(cfg)
    client = MlflowClient()
    for old in find_child_runs(client, parent_run_id, trial_id):
        client.delete_run(old.info.run_id)
    flat = {"trial_id": trial_id, "lr": params["lr"]}
    for t, w in (params.get("task_weights") or {}).items():
        flat[f"lambda.{t}"] = round(w, 6)
    flat.update({k: params[k] for k in OPTIONAL if k in params})
    return tracking.start_run(cfg, run_name, parent_run_id=parent_run_id,
                              tags={TAG_STAGE: stage, TAG_TRIAL: trial_id, "mtl_ray.attempt": str(attempt)},
                              extra_params={f"trial.{k}": v for k, v in flat.items()})


def mtl_trial(config: dict[str, Any], *, cfg_dict: dict[str, Any], data: dict[str, Any],
           parent_run_id: str | None, sweep_dir: str, stage: str = STAGE_TRIAL) -> None:
    """Tune's function trainable: one TorchTrainer fit with this trial's hyperparameters; every
    validation the workers report reaches Tune through ``TuneReportCallback``."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train import build_trainer, make_loop_config, train_datasets

    cfg = RunConfig.model_validate(cfg_dict)
    ctx = ray_tune.get_context()
    trial_id = ctx.get_trial_id()
    attempt = _mark_start(sweep_dir, trial_id)
    params = trial_params(config, cfg.task_names)
    run_id = None
    if parent_run_id:
        run_id = _child_run(cfg, parent_run_id, trial_id, f"{Path(sweep_dir).name}/{ctx.get_trial_name()}",
                            params, attempt, stage)
    loop_config = make_loop_config(cfg, data, run_id, **params)
    trainer = build_trainer(cfg, loop_config, train_datasets(cfg, data), run_name=f"{trial_id}-{attempt}",
                            storage_path=str(Path(sweep_dir) / "train"), callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except BaseException:
        _end_if_running(run_id, "FAILED")
        raise
    _end_if_running(run_id, "FINISHED")


def _end_if_running(run_id: str | None, status: str) -> None:
    """Close the trial's run unless the driver already did: when Tune stops a trial (ASHA), the
    driver's callback marks the run KILLED before the trial is told to stop, and the fit then
    fails in the trial; that failure must not turn KILLED into FAILED."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


# ---------------------------------------------------------------------------- driver side


def ran_full_budget(result: dict[str, Any] | None, max_steps: int) -> bool:
    """A trial's last result says it trained to the end (all steps, or the loop's own patience)."""
    result = result or {}
    return int(result.get("step", 0) or 0) >= max_steps or bool(result.get("stopped_early", 0))


def _close_runs(uri: str | None, parent_run_id: str, status: str = "KILLED", trial_id: str | None = None) -> int:
    """Set every still RUNNING child of the parent (of one trial, with ``trial_id``) to ``status``;
    returns how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    n = 0
    for run in find_child_runs(client, parent_run_id, trial_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
            n += 1
    return n


def reap_orphan_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many.

    A stopped trial's actor is killed and its Train controller with it, but the controller's
    worker placement group lives as long as the job (Ray's lifetime rule for non-detached groups).
    Ray Train's own ``PlacementGroupCleaner`` should remove it, yet it finds the cluster through
    the State API without an address, which fails when several Ray instances run on one machine
    ("Found multiple active Ray instances"); the group then holds its CPUs for the rest of the sweep
    and later trials wait forever. Groups the driver made (Tune's trial groups) have no creating
    actor and are never touched."""
    import ray
    from ray._private.state import state as gcs_state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in gcs_state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached
                or not pg.creator_actor_dead or ray.ActorID(pg.creator_actor_id).is_nil()
                or pg.creator_job_id.hex() != job):
            continue
        try:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        except Exception:
            pass
    return removed


def _run_closer(uri: str | None, parent_run_id: str | None, max_steps: int, reap_every_s: float = 3.0):
    """A Tune callback (driver side) that closes a trial's child run when the trial ends: FINISHED
    when it trained its whole budget, KILLED when ASHA stopped it, FAILED on error; and that removes
    the placement groups stopped trials leave behind (``reap_orphan_placement_groups``)."""
    from ray import tune as ray_tune

    class RunCloser(ray_tune.Callback):
        last_reap = 0.0

        def on_step_begin(self, iteration, trials, **info):
            now = time.time()
            if now - self.last_reap >= reap_every_s:
                self.last_reap = now
                try:
                    n = reap_orphan_placement_groups()
                    if n:
                        print(f"[tune] removed {n} placement group(s) left by stopped trials", flush=True)
                except Exception as err:
                    print(f"[tune] could not check for orphan placement groups: {err}", flush=True)

        def _close(self, trial, error: bool) -> None:
            if not parent_run_id:
                return
            status = "FAILED" if error else (
                "FINISHED" if ran_full_budget(trial.last_result, max_steps) else "KILLED")
            try:
                _close_runs(uri, parent_run_id, status, trial.trial_id)
            except Exception as err:  # bookkeeping must not stop the sweep; the driver sweeps up after fit
                print(f"[tune] could not close the MLflow run of trial {trial.trial_id}: {err}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, error=True)

    return RunCloser()


def _sweep_dir(cfg: RunConfig, resume: bool) -> Path:
    root = Path(cfg.output_dir).resolve() / cfg.name
    if resume:
        runs = sorted(p for p in root.glob("sweep-*") if (p / EXPERIMENT).is_dir())
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier sweep under {root}")
        return runs[-1]
    base = root / time.strftime("sweep-%Y%m%d-%H%M%S")
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _trial_config(cfg: RunConfig) -> RunConfig:
    """The config trials get: paths made absolute (Tune runs a trial in its own working directory)."""
    from mtl.packages import resolve_encoder
    from pipelines.tracking import absolute_tracking_uri

    out = cfg.model_copy(deep=True)
    out.mlflow.tracking_uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    out.model.encoder = str(Path(resolve_encoder(cfg.model.encoder)).resolve())
    out.output_dir = str(Path(cfg.output_dir).resolve())
    return out


def concurrency(cfg: RunConfig) -> int:
    """``tune.max_concurrent``, or as many trials as the cluster fits (``derive_max_concurrent``)."""
    import ray

    from pipelines.train import resolve_use_gpu

    spec = cfg.tune or TuneSpec()
    if spec.max_concurrent:
        return spec.max_concurrent
    res = ray.cluster_resources()
    return derive_max_concurrent(res.get("CPU", 1), cfg.train.num_workers, cfg.train.cpus_per_worker,
                                 TRIAL_CPUS, res.get("GPU", 0), resolve_use_gpu(cfg))


def _trainable(trial_cfg: RunConfig, data, parent_run_id, sweep_dir: Path, stage: str):
    from ray import tune as ray_tune

    fn = ray_tune.with_parameters(mtl_trial, cfg_dict=trial_cfg.to_dict(), data=data,
                                  parent_run_id=parent_run_id, sweep_dir=str(sweep_dir), stage=stage)
    return ray_tune.with_resources(fn, {"cpu": TRIAL_CPUS})


def _tuner(cfg: RunConfig, trainable, sweep_dir: Path, callbacks: list, resume: bool,
           name: str = EXPERIMENT, param_space: dict | None = None, num_samples: int | None = None,
           asha: bool = True, max_concurrent: int = 1):
    """A new Tuner, or the one saved under ``sweep_dir/name`` when resuming."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    path = sweep_dir / name
    if resume and ray_tune.Tuner.can_restore(str(path)):
        print(f"[tune] restoring {path}", flush=True)
        return ray_tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                      restart_errored=True)
    spec = cfg.tune or TuneSpec()
    if spec.search == "optuna" and asha:
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=cfg.seed), max_concurrent  # wrapped in a ConcurrencyLimiter
    else:  # Tune's default random search; it limits concurrency itself
        search_alg, limit = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=max_concurrent), None
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_t(cfg.train.max_steps, cfg.train.eval_every),
                               grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
                 if asha else FIFOScheduler())
    return ray_tune.Tuner(
        trainable,
        param_space=param_space if param_space is not None else search_space(cfg),
        tune_config=ray_tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=num_samples or spec.num_samples,
                                        max_concurrent_trials=limit),
        # a copy: Tune appends its own loggers (with open files) to the list it is given
        run_config=ray_tune.RunConfig(name=name, storage_path=str(sweep_dir), callbacks=list(callbacks),
                                      failure_config=ray_tune.FailureConfig(max_failures=0), verbose=1),
    )


def unfinished_trials(experiment_path: str | Path) -> list[str]:
    """Trials the saved experiment state holds as not finished (what ``Tuner.restore`` resumes).

    After Ctrl-C, Tune writes its state and then stops the running trials, so in memory they read
    TERMINATED like finished ones; the saved state is the record that tells them apart."""
    from ray.tune import ExperimentAnalysis

    return [t.trial_id for t in ExperimentAnalysis(str(experiment_path)).trials
            if t.status not in ("TERMINATED", "ERROR")]


def _fit(tuner, experiment_path: Path, uri: str | None, parent_run_id: str | None):
    """``tuner.fit()``; raises ``SweepInterrupted`` when trials were left unfinished (Ctrl-C)."""
    grid = tuner.fit()
    left = unfinished_trials(experiment_path)
    if left:
        try:
            reap_orphan_placement_groups()
        except Exception:
            pass
        if parent_run_id:
            _close_runs(uri, parent_run_id)
            from pipelines.tracking import end_run

            end_run(parent_run_id, "KILLED")
        raise SweepInterrupted(f"{len(left)} of {len(grid)} trials did not finish; "
                               f"continue with `mtl-ray tune --config ... --resume`")
    return grid


def _trial_rows(grid, tasks: list[str], max_steps: int, budget: int) -> list[dict[str, Any]]:
    """One row per trial: params, best objective, iterations run, stopped early or not, and the
    per-task validation metrics of its best evaluation."""
    rows = []
    for res in grid:
        cfg = res.config or {}
        params = trial_params(cfg, tasks) if "lr" in cfg else {}
        df = res.metrics_dataframe
        last = res.metrics or {}
        row: dict[str, Any] = {"trial_id": last.get("trial_id") or (df["trial_id"].iloc[-1] if df is not None and len(df) else None),
                               "lr": params.get("lr")}
        weights = params.get("task_weights") or {}
        for t in tasks:
            row[f"lambda/{t}"] = weights.get(t, float("nan"))
        for k in OPTIONAL:
            if k in params:
                row[k] = params[k]
        if df is not None and METRIC in df and df[METRIC].notna().any():
            best = df.loc[df[METRIC].idxmax()]
            row.update({"objective": float(best[METRIC]), "best_step": int(best.get("step", -1)),
                        "final_objective": float(df[METRIC].iloc[-1]),
                        "checkpoint_path": best.get("checkpoint_path")})
            iterations = int(df["training_iteration"].max())
        else:
            best = None
            row.update({"objective": float("nan"), "best_step": None, "final_objective": float("nan"),
                        "checkpoint_path": None})
            iterations = 0
        row["iterations"] = iterations
        row["steps"] = int(last.get("step", 0) or 0)
        row["error"] = res.error is not None
        row["stopped_early"] = (not row["error"]) and not ran_full_budget(last, max_steps) and iterations < budget
        row["patience_stop"] = bool(last.get("stopped_early", 0))
        if best is not None:
            for col in df.columns:
                if col.startswith("val/"):
                    row[col] = float(best[col])
        row["trial_dir"] = res.path
        rows.append(row)
    return rows


def _plot(table, tasks: list[str], path: Path) -> Path:
    """Objective vs learning rate (log x) and vs each task's weight; ASHA-stopped trials hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [("lr", "learning rate")] + [(f"lambda/{t}", f"λ {t}") for t in tasks
                                        if table[f"lambda/{t}"].notna().any()]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3.4), squeeze=False)
    stopped = table["stopped_early"].astype(bool).to_numpy()
    y = table["objective"].to_numpy(dtype=float)
    best = int(np.nanargmax(y)) if np.isfinite(y).any() else None
    for ax, (col, label) in zip(axes[0], cols):
        x = table[col].to_numpy(dtype=float)
        ax.scatter(x[~stopped], y[~stopped], c="tab:blue", label="full budget")
        ax.scatter(x[stopped], y[stopped], facecolors="none", edgecolors="tab:blue", label="stopped by ASHA")
        if best is not None:
            ax.scatter([x[best]], [y[best]], marker="*", s=180, c="tab:orange", label="best", zorder=3)
        if col == "lr":
            ax.set_xscale("log")
        else:
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("validation objective")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Sweep: best validation objective per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _copy_model(checkpoint_path: str, dest: Path) -> Path:
    from ray.train import Checkpoint

    from pipelines.train import MODEL_DIR

    shutil.rmtree(dest, ignore_errors=True)
    with Checkpoint(checkpoint_path).as_directory() as d:
        shutil.copytree(Path(d) / MODEL_DIR, dest)
    return dest


def _open_parent(cfg: RunConfig, sweep_dir: Path, resume: bool, extra_params: dict[str, Any]) -> str | None:
    from pipelines import tracking

    if not cfg.mlflow.enabled:
        return None
    id_file = sweep_dir / "mlflow_run_id"
    if resume and id_file.exists():
        from mlflow.tracking import MlflowClient

        run_id = id_file.read_text().strip()
        tracking.setup(cfg)
        MlflowClient().update_run(run_id, status="RUNNING")
        return run_id
    run_id = tracking.start_run(cfg, f"{cfg.name}/{sweep_dir.name}", tags={TAG_STAGE: STAGE_SWEEP},
                                extra_params=extra_params)
    id_file.write_text(run_id)
    return run_id


def run_sweep(cfg: RunConfig, resume: bool = False, data: dict[str, Any] | None = None,
              callbacks: list | None = None) -> dict[str, Any]:
    """Sweep -> best trial -> test sets -> MLflow parent run -> registered ``champion``.

    ``resume`` restores the latest sweep of this config's name (finished trials are kept, unfinished
    ones restart); ``callbacks`` are extra Tune callbacks. Returns ``best`` (params and objective),
    ``test_metrics``, ``model_uri``, ``registered_version``, ``parent_run_id``, ``sweep_dir``,
    ``table`` (a DataFrame, one row per trial), ``wall_s``, ``trials``, ``stopped_early``, and
    ``equal_weights`` (the equal-weights trial's objective, with ``tune.compare_equal``; else None)."""
    from pipelines import tracking
    from pipelines.data import read_tasks
    from pipelines.ray_utils import init_ray
    from pipelines.train import check_train_config

    t0 = time.time()
    if cfg.tune is None:
        cfg = cfg.model_copy(update={"tune": TuneSpec()})
    check_train_config(cfg)
    check_space(cfg)
    data = data or read_tasks(cfg)  # fails before Ray on bad data
    init_ray()
    sweep_dir = _sweep_dir(cfg, resume)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec = cfg.tune
    budget = max_t(cfg.train.max_steps, cfg.train.eval_every)
    n_concurrent = concurrency(cfg)
    uri = tracking.absolute_tracking_uri(cfg.mlflow.tracking_uri)
    parent = _open_parent(cfg, sweep_dir, resume, {
        "tune.max_t": budget, "tune.max_concurrent_trials": n_concurrent, "tune.trial_cpus": TRIAL_CPUS})
    print(f"[tune] {cfg.name}: {spec.num_samples} trials ({spec.search} search, ASHA max_t {budget}, "
          f"grace {spec.grace_period}, η {spec.reduction_factor}), {n_concurrent} at a time; outputs in {sweep_dir}",
          flush=True)
    try:
        summary = _sweep(cfg, data, sweep_dir, parent, uri, budget, n_concurrent, callbacks, resume, t0)
    except SweepInterrupted:
        raise
    except BaseException:
        if parent:  # nothing stays RUNNING: open trial runs were cut short, the sweep failed
            _close_runs(uri, parent, "KILLED")
            tracking.end_run(parent, "FAILED")
        raise
    return summary


def _sweep(cfg: RunConfig, data: dict[str, Any], sweep_dir: Path, parent: str | None, uri: str, budget: int,
           n_concurrent: int, callbacks: list | None, resume: bool, t0: float) -> dict[str, Any]:
    import pandas as pd

    from pipelines import tracking
    from pipelines.train import evaluate_test

    spec = cfg.tune
    tasks = cfg.task_names
    trial_cfg = _trial_config(cfg)
    all_callbacks = [_run_closer(uri, parent, cfg.train.max_steps)] + list(callbacks or [])
    tuner = _tuner(cfg, _trainable(trial_cfg, data, parent, sweep_dir, STAGE_TRIAL), sweep_dir,
                   all_callbacks, resume, max_concurrent=n_concurrent)
    grid = _fit(tuner, sweep_dir / EXPERIMENT, uri, parent)
    if parent:
        _close_runs(uri, parent)  # anything a killed trial left open
    reap_orphan_placement_groups()
    table = pd.DataFrame(_trial_rows(grid, tasks, cfg.train.max_steps, budget))
    if not table["objective"].notna().any():
        raise RuntimeError(f"no trial reported an objective; see {sweep_dir / EXPERIMENT}")
    best_row = table.loc[table["objective"].idxmax()]
    best_res = next(r for r in grid if r.path == best_row["trial_dir"])
    best_params = trial_params(best_res.config, tasks)
    best = {"trial_id": best_row["trial_id"], **best_params, "objective": float(best_row["objective"]),
            "best_step": int(best_row["best_step"]), "iterations": int(best_row["iterations"])}
    print(f"[tune] best trial {best['trial_id']}: objective {best['objective']:.4f} at step {best['best_step']}, "
          f"lr {best['lr']:.3g}" + "".join(f", λ {t} {w:.2f}" for t, w in (best.get("task_weights") or {}).items()),
          flush=True)

    # Equal weights at the best lr, full budget (tune.compare_equal).
    equal = None
    if spec.compare_equal and len(tasks) > 1:
        eq_cfg = equal_weights_config(best_res.config, tasks)
        eq_tuner = _tuner(cfg, _trainable(trial_cfg, data, parent, sweep_dir, STAGE_EQUAL), sweep_dir,
                          all_callbacks, resume, name=EQUAL_EXPERIMENT, param_space=eq_cfg, num_samples=1,
                          asha=False)
        eq_grid = _fit(eq_tuner, sweep_dir / EQUAL_EXPERIMENT, uri, parent)
        eq_rows = _trial_rows(eq_grid, tasks, cfg.train.max_steps, budget)
        if eq_rows and eq_rows[0]["objective"] == eq_rows[0]["objective"]:
            equal = {"trial_id": eq_rows[0]["trial_id"], "lr": eq_rows[0]["lr"],
                     "objective": eq_rows[0]["objective"], "best_step": int(eq_rows[0]["best_step"]),
                     "best_minus_equal": best["objective"] - eq_rows[0]["objective"]}
            print(f"[tune] equal weights at lr {equal['lr']:.3g}: objective {equal['objective']:.4f} "
                  f"(best tuned {best['objective']:.4f}, difference {equal['best_minus_equal']:+.4f})", flush=True)

    # The winner: best checkpoint -> model dir -> test sets.
    model_dir = _copy_model(best_row["checkpoint_path"], sweep_dir / "model")
    test = evaluate_test(cfg, model_dir, data)
    test_metrics = {t: r["metrics"] for t, r in test.items()}
    shown = table.drop(columns=["checkpoint_path", "trial_dir"])
    csv_path = sweep_dir / "sweep_table.csv"
    shown.to_csv(csv_path, index=False)
    png_path = _plot(table, tasks, sweep_dir / "sweep.png")
    n_stopped = int(table["stopped_early"].sum())

    summary: dict[str, Any] = {
        "best": best, "test_metrics": test_metrics, "model_uri": None, "registered_version": None,
        "parent_run_id": parent, "sweep_dir": str(sweep_dir), "trials": len(table), "stopped_early": n_stopped,
        "errors": int(table["error"].sum()), "max_t": budget, "max_concurrent_trials": n_concurrent,
        "equal_weights": equal,
    }
    if parent:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.log_artifact(parent, str(csv_path), "sweep")
        client.log_artifact(parent, str(png_path), "sweep")
        best_flat = {"best.trial_id": best["trial_id"], "best.lr": best["lr"],
                     **{f"best.lambda.{t}": round(w, 6) for t, w in (best.get("task_weights") or {}).items()},
                     **{f"best.{k}": best[k] for k in OPTIONAL if k in best}}
        from mlflow.entities import Metric, Param

        existing = client.get_run(parent).data.params
        new_params = [Param(k, str(v)) for k, v in best_flat.items() if k not in existing]
        if new_params:
            client.log_batch(parent, params=new_params)
        now = int(time.time() * 1000)
        metrics = {"best_objective": best["objective"], "trials": len(table), "stopped_early": n_stopped}
        if equal:
            metrics.update({"equal_weights_objective": equal["objective"],
                            "best_minus_equal_objective": equal["best_minus_equal"]})
        client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        tracking.log_test_results(parent, test)
        sizes = {t: {s: len(d.splits[s]) for s in d.splits} for t, d in data.items()}
        card_extra = {"sweep": f"{len(table)} trials ({spec.search} search, ASHA stopped {n_stopped})",
                      "best trial": best["trial_id"], "best validation objective": f"{best['objective']:.4f}",
                      "learning rate": f"{best['lr']:.3g}"}
        for t, w in (best.get("task_weights") or {}).items():
            card_extra[f"loss weight λ {t}"] = f"{w:.3f}"
        if equal:
            card_extra["equal weights (λ = 1) validation objective"] = f"{equal['objective']:.4f}"
        client.log_text(parent, tracking.model_card(cfg, test, sizes, card_extra), "model_card.md")
        summary["model_uri"] = tracking.log_model(parent, model_dir)
        version = tracking.register(summary["model_uri"], cfg.mlflow.registered_model, test,
                                    description=f"Best of sweep {sweep_dir.name}: trial {best['trial_id']}, "
                                                f"validation objective {best['objective']:.4f}")
        summary["registered_version"] = version
        best_child = find_child_runs(client, parent, best["trial_id"], STAGE_TRIAL)
        version_tags = {"mtl_ray.trial_id": best["trial_id"], "mtl_ray.sweep": sweep_dir.name,
                        "mtl_ray.validation_objective": f"{best['objective']:.6f}"}
        if best_child:
            version_tags["mtl_ray.trial_run_id"] = best_child[0].info.run_id
            best["mlflow_run_id"] = best_child[0].info.run_id
        for k, v in version_tags.items():
            client.set_model_version_tag(cfg.mlflow.registered_model, version, k, v)
    summary["wall_s"] = round(time.time() - t0, 1)
    if parent:
        from mlflow.tracking import MlflowClient

        MlflowClient().log_metric(parent, "wall_s", summary["wall_s"])
        tracking.log_summary(parent, summary)
        tracking.end_run(parent)
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["table"] = shown
    brief = ["trial_id", "lr", *[c for c in shown.columns if c.startswith("lambda/")],
             *[k for k in OPTIONAL if k in shown.columns], "objective", "best_step", "iterations", "stopped_early"]
    print(shown[brief].to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    print(f"[tune] done in {summary['wall_s']}s: {len(table)} trials, {n_stopped} stopped early by ASHA; "
          "test: " + ", ".join(f"{t} " + " ".join(f"{k}={v:.4f}" for k, v in m.items())
                               for t, m in test_metrics.items()), flush=True)
    return summary
