"""The Ray Tune sweep over whatever trainer factory it is handed: learning rate and per-task loss
weights, ASHA, one MLflow child run per trial. It knows nothing of how a trial trains or of what
is published afterwards (``pipelines.tuning`` hands it the trainer and publishes the winner).

    from tune.sweep import run_sweep
    result = run_sweep(cfg, trainer_factory)      # a SweepResult: the best trial, its checkpoint, the table

Each trial is a function trainable that asks ``trainer_factory(TrialSpec)`` for a Ray Train trainer
(a ``TorchTrainer``) and fits it with ``TuneReportCallback``, so every validation of the training
loop is one Tune iteration and ASHA can stop weak trials after ``grace_period`` evaluations. Trials
are compared on the unweighted validation ``objective`` (the loss weights change the loss's scale,
not the objective's).

MLflow: one parent run for the sweep (``mtl_ray.stage=sweep``) and one child run per trial
(``mtl_ray.stage=trial``, ``mlflow.parentRunId``) holding the trial's parameters and whatever the
trainer logs into it (``TrialSpec.mlflow_run_id``). The trial closes its own run when its fit ends;
a trial that ASHA stops is killed mid-fit, so a driver-side Tune callback closes its run (KILLED),
and the driver closes anything still open after ``fit``. The parent gets the trial table (CSV),
the plot and the best parameters, and is closed (FINISHED) before ``run_sweep`` returns.

Outputs go under ``output_dir/name/sweep-<time>/``: ``trials/`` (Tune's experiment, restorable),
``train/`` (each trial's Ray Train run and checkpoints), ``starts/`` (one marker per trial start),
``sweep_table.csv``, ``sweep.png``. ``output_dir`` may be object storage (``s3://bucket/runs?...``,
``mtl.storage``): Tune and the trials' Ray Train runs then write there through its pyarrow
filesystem, the trials write their start markers there, and the driver stages its own files
(table, plot, MLflow run id) in a local folder that it uploads; ``--resume`` lists the bucket.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl import storage
from mtl.config import RunConfig, TuneSpec, check_config
from mtl.storage import RunFolder
from tune.space import (
    OPTIONAL,
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
CHECKPOINT_PATH = "checkpoint_path"  # the metric TuneReportCallback fills with the Train checkpoint's path


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (Ctrl-C); ``--resume`` continues it."""


@dataclass(frozen=True)
class TrialSpec:
    """What a trainer factory gets for one trial (in the trial's process)."""

    cfg: RunConfig  # the run config, paths absolute (a trial runs in its own working directory)
    params: dict[str, Any]  # lr, task_weights (when searched) and the optional knobs this trial samples
    mlflow_run_id: str | None  # the trial's MLflow child run, for the trainer's curves; None without MLflow
    run_name: str  # the Ray Train run's name, unique per trial attempt
    storage_path: str  # where Ray Train keeps this trial's runs and checkpoints (a path on storage_filesystem)
    callbacks: list = field(default_factory=list)  # Ray Train callbacks the trainer must carry
    storage_filesystem: Any = None  # the pyarrow filesystem of storage_path (None: local)


# Builds the trial's Ray Train trainer (anything with ``fit()``, e.g. a TorchTrainer); it is sent to
# the trial processes, so it must pickle (a module-level function or a small object holding data refs).
TrainerFactory = Callable[[TrialSpec], Any]


@dataclass
class SweepResult:
    """The sweep's outcome: the best trial and where its best checkpoint lies, and the trial table."""

    sweep_dir: Path  # the sweep's local folder (with an object-storage output_dir, its staging copy)
    best: dict[str, Any]  # trial_id, lr, task_weights, optional knobs, objective, best_step, iterations
    best_checkpoint: str  # the best trial's best Ray Train checkpoint (a local directory or a URI)
    best_metrics: dict[str, Any]  # the validation metrics reported with that checkpoint
    table: Any  # pandas DataFrame, one row per trial (params, objective, iterations, val/ metrics, ...)
    parent_run_id: str | None  # the MLflow parent run (closed), or None without MLflow
    max_t: int  # ASHA's budget in evaluations
    max_concurrent_trials: int
    equal_weights: dict[str, Any] | None = None  # with tune.compare_equal: the λ = 1 trial's objective
    wall_s: float = 0.0
    remote: str | None = None  # the sweep folder's URI when output_dir is object storage

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.sweep_dir, self.remote)

    @property
    def trials(self) -> int:
        return len(self.table)

    @property
    def stopped_early(self) -> int:
        return int(self.table["stopped_early"].sum())

    @property
    def errors(self) -> int:
        return int(self.table["error"].sum())

    def shown_table(self):
        """The table without paths (what the CSV holds)."""
        return self.table.drop(columns=[CHECKPOINT_PATH, "trial_dir"])


# ---------------------------------------------------------------------------- trial side


def _mark_start(sweep_dir: str, trial_id: str) -> int:
    """Write ``starts/<trial id>/<n>`` for this start of the trial; returns n (1 for the first)."""
    if storage.is_remote(sweep_dir):
        # no exclusive create in object storage; a trial's attempts never overlap, so the next free n will do
        d = storage.join(sweep_dir, "starts", trial_id)
        n = 1 + max((int(f) for f in storage.list_files(d) if f.isdigit()), default=0)
        storage.write_text(storage.join(d, str(n)), f"{time.time():.3f} pid {os.getpid()}\n")
        return n
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

    from mtl import tracking

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


def sweep_trial(config: dict[str, Any], *, trainer_factory: TrainerFactory, cfg_dict: dict[str, Any],
                parent_run_id: str | None, sweep_dir: str, stage: str = STAGE_TRIAL) -> None:
    """Tune's function trainable: the factory's trainer for this trial's hyperparameters, fitted;
    every validation the workers report reaches Tune through ``TuneReportCallback``."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = RunConfig.model_validate(cfg_dict)
    ctx = ray_tune.get_context()
    trial_id = ctx.get_trial_id()
    attempt = _mark_start(sweep_dir, trial_id)
    params = trial_params(config, cfg.task_names)
    run_id = None
    if parent_run_id:
        run_id = _child_run(cfg, parent_run_id, trial_id, f"{storage.name(sweep_dir)}/{ctx.get_trial_name()}",
                            params, attempt, stage)
    storage_path, storage_fs = storage.ray_storage(storage.join(sweep_dir, "train"))
    trainer = trainer_factory(TrialSpec(cfg=cfg, params=params, mlflow_run_id=run_id,
                                        run_name=f"{trial_id}-{attempt}", storage_path=storage_path,
                                        callbacks=[TuneReportCallback()], storage_filesystem=storage_fs))
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

    Workaround of a Ray bug: a stopped trial's actor is killed and its Train controller with it,
    but the controller's worker placement group lives as long as the job (Ray's lifetime rule for
    non-detached groups; Tune + Train V2, see ray-project/ray#58515, which added Train's
    ``PlacementGroupCleaner`` for it, and #62753, a race that still orphans groups).
    That cleaner should remove it, yet it finds the cluster through
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


RUN_ID_FILE = "mlflow_run_id"  # the parent run's id, in the sweep folder


def sweep_folder(cfg: RunConfig, resume: bool) -> RunFolder:
    """A new ``output_dir/name/sweep-<time>``; with ``resume``, the latest one holding Tune's
    experiment. In object storage the bucket is listed, and the parent run's id fetched into the
    (empty, on a new cluster) staging folder."""
    if not storage.is_remote(cfg.output_dir):
        root = Path(cfg.output_dir).resolve() / cfg.name
        if resume:
            runs = sorted(p for p in root.glob("sweep-*") if (p / EXPERIMENT).is_dir())
            if not runs:
                raise FileNotFoundError(f"--resume: no earlier sweep under {root}")
            return RunFolder(runs[-1])
        base = root / time.strftime("sweep-%Y%m%d-%H%M%S")
        path, i = base, 1
        while path.exists():
            i += 1
            path = base.with_name(f"{base.name}-{i}")
        return RunFolder(path)
    root = storage.join(cfg.output_dir, cfg.name)
    if resume:
        runs = [d for d in storage.list_dirs(root, "sweep-") if storage.exists(storage.join(root, d, EXPERIMENT))]
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier sweep under {root}")
        folder = RunFolder.staged(storage.join(root, runs[-1]), cfg.name)
        folder.fetch(RUN_ID_FILE)
        return folder
    base = time.strftime("sweep-%Y%m%d-%H%M%S")
    stamp, i = base, 1
    while storage.exists(storage.join(root, stamp)):
        i += 1
        stamp = f"{base}-{i}"
    return RunFolder.staged(storage.join(root, stamp), cfg.name)


def trial_config(cfg: RunConfig) -> RunConfig:
    """The config trials get: paths made absolute (Tune runs a trial in its own working directory)."""
    from mtl.packages import resolve_encoder
    from mtl.tracking import absolute_tracking_uri

    out = cfg.model_copy(deep=True)
    out.mlflow.tracking_uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    out.model.encoder = str(Path(resolve_encoder(cfg.model.encoder)).resolve())
    if not storage.is_remote(cfg.output_dir):
        out.output_dir = str(Path(cfg.output_dir).resolve())
    return out


def _use_gpu(cfg: RunConfig) -> bool:
    """``train.use_gpu: auto`` -> GPUs when the connected cluster has any (what the trainer decides too)."""
    import ray

    if cfg.train.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.train.use_gpu)


def concurrency(cfg: RunConfig) -> int:
    """``tune.max_concurrent``, or as many trials as the cluster fits (``derive_max_concurrent``)."""
    import ray

    spec = cfg.tune or TuneSpec()
    if spec.max_concurrent:
        return spec.max_concurrent
    res = ray.cluster_resources()
    return derive_max_concurrent(res.get("CPU", 1), cfg.train.num_workers, cfg.train.cpus_per_worker,
                                 TRIAL_CPUS, res.get("GPU", 0), _use_gpu(cfg), reserve_cpus=cfg.data.cpus)


def _trainable(trial_cfg: RunConfig, trainer_factory: TrainerFactory, parent_run_id, folder: RunFolder, stage: str):
    from ray import tune as ray_tune

    # with_parameters puts the factory (and the data it holds) in the object store once; trials get
    # the sweep folder where every node reaches it (the URI in object storage, never the staging copy)
    fn = ray_tune.with_parameters(sweep_trial, trainer_factory=trainer_factory, cfg_dict=trial_cfg.to_dict(),
                                  parent_run_id=parent_run_id, sweep_dir=folder.where, stage=stage)
    return ray_tune.with_resources(fn, {"cpu": TRIAL_CPUS})


def _tuner(cfg: RunConfig, trainable, folder: RunFolder, callbacks: list, resume: bool,
           name: str = EXPERIMENT, param_space: dict | None = None, num_samples: int | None = None,
           asha: bool = True, max_concurrent: int = 1):
    """A new Tuner, or the one saved under ``<sweep folder>/name`` when resuming."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    storage_path, fs = folder.storage()
    path = _experiment(folder, name)[0]
    if resume and ray_tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[tune] restoring {storage.join(folder.where, name)}", flush=True)
        return ray_tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                      restart_errored=True, storage_filesystem=fs)
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
        run_config=ray_tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                      callbacks=list(callbacks),
                                      failure_config=ray_tune.FailureConfig(max_failures=0), verbose=1),
    )


def _experiment(folder: RunFolder, name: str = EXPERIMENT) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) of Tune's experiment ``name`` in the sweep folder."""
    return storage.ray_storage(storage.join(folder.where, name))


def unfinished_trials(experiment_path: str | Path, storage_filesystem: Any = None) -> list[str]:
    """Trials the saved experiment state holds as not finished (what ``Tuner.restore`` resumes).

    After Ctrl-C, Tune writes its state and then stops the running trials, so in memory they read
    TERMINATED like finished ones; the saved state is the record that tells them apart."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_path), storage_filesystem=storage_filesystem)
    return [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]


def _fit(tuner, experiment: tuple[str, Any], uri: str | None, parent_run_id: str | None):
    """``tuner.fit()``; raises ``SweepInterrupted`` when trials were left unfinished (Ctrl-C).
    ``experiment`` is (path, filesystem) of the experiment's saved state (``_experiment``)."""
    grid = tuner.fit()
    left = unfinished_trials(*experiment)
    if left:
        try:
            reap_orphan_placement_groups()
        except Exception:
            pass
        if parent_run_id:
            from mtl.tracking import end_run

            _close_runs(uri, parent_run_id)
            end_run(parent_run_id, "KILLED")
        raise SweepInterrupted(f"{len(left)} of {len(grid)} trials did not finish; "
                               f"continue with `mtl-ray tune --config ... --resume`")
    return grid


def _trial_row(res, tasks: list[str], max_steps: int, budget: int) -> dict[str, Any]:
    """One trial's row: params, best objective (and the checkpoint reported with it), iterations
    run, stopped early or not, and the per-task validation metrics of its best evaluation."""
    params = trial_params(res.config, tasks) if "lr" in (res.config or {}) else {}
    df, last = res.metrics_dataframe, res.metrics or {}
    row: dict[str, Any] = {"trial_id": last.get("trial_id") or (df["trial_id"].iloc[-1] if df is not None and len(df) else None),
                           "lr": params.get("lr")}
    weights = params.get("task_weights") or {}
    row.update({f"lambda/{t}": weights.get(t, float("nan")) for t in tasks})
    row.update({k: params[k] for k in OPTIONAL if k in params})
    best = None
    if df is not None and METRIC in df and df[METRIC].notna().any():
        best = df.loc[df[METRIC].idxmax()]
    row.update({"objective": float(best[METRIC]) if best is not None else float("nan"),
                "best_step": int(best.get("step", -1)) if best is not None else None,
                "final_objective": float(df[METRIC].iloc[-1]) if best is not None else float("nan"),
                CHECKPOINT_PATH: best.get(CHECKPOINT_PATH) if best is not None else None})
    iterations = int(df["training_iteration"].max()) if best is not None else 0
    row["iterations"] = iterations
    row["steps"] = int(last.get("step", 0) or 0)
    row["error"] = res.error is not None
    row["stopped_early"] = (not row["error"]) and not ran_full_budget(last, max_steps) and iterations < budget
    row["patience_stop"] = bool(last.get("stopped_early", 0))
    if best is not None:
        row.update({c: float(best[c]) for c in df.columns if c.startswith("val/")})
    row["trial_dir"] = res.path
    return row


def _best(grid, table, tasks: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(best trial summary, the metrics reported with its best checkpoint), by Tune's own pick:
    the trial whose best-ever objective is highest (``get_best_result(scope="all")``).

    The trial reports no Tune checkpoint (``TuneReportCallback`` passes the Ray Train checkpoint's
    path as the metric ``checkpoint_path``), so ``Result.get_best_checkpoint`` has nothing to
    return; the path comes from the best objective's row of the trial's results."""
    res = grid.get_best_result(metric=METRIC, mode=MODE, scope="all")
    df = res.metrics_dataframe
    best_metrics = df.loc[df[METRIC].idxmax()].dropna().to_dict()
    row = table.set_index("trial_dir").loc[res.path]
    best = {"trial_id": row["trial_id"], **trial_params(res.config, tasks), "objective": float(row["objective"]),
            "best_step": int(row["best_step"]), "iterations": int(row["iterations"])}
    return best, best_metrics


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


def _open_parent(cfg: RunConfig, folder: RunFolder, resume: bool, extra_params: dict[str, Any]) -> str | None:
    """The sweep's MLflow parent run: the one recorded in the sweep folder when resuming, else a new one."""
    from mtl import tracking

    if not cfg.mlflow.enabled:
        return None
    id_file = folder.local / RUN_ID_FILE
    if resume and id_file.exists():
        from mlflow.tracking import MlflowClient

        run_id = id_file.read_text().strip()
        tracking.setup(cfg)
        MlflowClient().update_run(run_id, status="RUNNING")
        return run_id
    run_id = tracking.start_run(cfg, f"{cfg.name}/{folder.name}", tags={TAG_STAGE: STAGE_SWEEP},
                                extra_params=extra_params)
    id_file.write_text(run_id)
    folder.sync()
    return run_id


def _log_parent(parent: str, result: SweepResult, csv_path: Path, png_path: Path) -> None:
    """The sweep's own record on the parent run: table, plot, best parameters and objective."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.log_artifact(parent, str(csv_path), "sweep")
    client.log_artifact(parent, str(png_path), "sweep")
    best, equal = result.best, result.equal_weights
    best_flat = {"best.trial_id": best["trial_id"], "best.lr": best["lr"],
                 **{f"best.lambda.{t}": round(w, 6) for t, w in (best.get("task_weights") or {}).items()},
                 **{f"best.{k}": best[k] for k in OPTIONAL if k in best}}
    existing = client.get_run(parent).data.params
    new_params = [Param(k, str(v)) for k, v in best_flat.items() if k not in existing]
    if new_params:
        client.log_batch(parent, params=new_params)
    metrics = {"best_objective": best["objective"], "trials": result.trials, "stopped_early": result.stopped_early,
               "sweep_wall_s": result.wall_s}
    if equal:
        metrics.update({"equal_weights_objective": equal["objective"],
                        "best_minus_equal_objective": equal["best_minus_equal"]})
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def run_sweep(cfg: RunConfig, trainer_factory: TrainerFactory, resume: bool = False,
              callbacks: list | None = None) -> SweepResult:
    """Sweep ``cfg.tune``'s space over the trainers ``trainer_factory`` builds; Ray must be running.

    ``resume`` restores the latest sweep of this config's name (finished trials are kept, unfinished
    ones restart); ``callbacks`` are extra Tune callbacks. With MLflow, the parent run is closed
    (FINISHED) when this returns; publishing the winner is the caller's."""
    from mtl.tracking import absolute_tracking_uri, end_run

    t0 = time.time()
    if cfg.tune is None:
        cfg = cfg.model_copy(update={"tune": TuneSpec()})
    check_config(cfg)
    folder = sweep_folder(cfg, resume)
    sweep_dir = folder.local
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec = cfg.tune
    budget = max_t(cfg.train.max_steps, cfg.train.eval_every)
    n_concurrent = concurrency(cfg)
    uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    parent = _open_parent(cfg, folder, resume, {
        "tune.max_t": budget, "tune.max_concurrent_trials": n_concurrent, "tune.trial_cpus": TRIAL_CPUS})
    print(f"[tune] {cfg.name}: {spec.num_samples} trials ({spec.search} search, ASHA max_t {budget}, "
          f"grace {spec.grace_period}, η {spec.reduction_factor}), {n_concurrent} at a time; outputs in {folder.where}",
          flush=True)
    try:
        result = _sweep(cfg, trainer_factory, folder, parent, uri, budget, n_concurrent, callbacks, resume)
        result.wall_s = round(time.time() - t0, 1)
        if parent:
            _log_parent(parent, result, sweep_dir / "sweep_table.csv", sweep_dir / "sweep.png")
            end_run(parent)
    except SweepInterrupted:
        raise
    except BaseException:
        if parent:  # nothing stays RUNNING: open trial runs were cut short, the sweep failed
            _close_runs(uri, parent, "KILLED")
            end_run(parent, "FAILED")
        raise
    _print_result(result)
    return result


def _sweep(cfg: RunConfig, trainer_factory: TrainerFactory, folder: RunFolder, parent: str | None, uri: str,
           budget: int, n_concurrent: int, callbacks: list | None, resume: bool) -> SweepResult:
    import pandas as pd

    tasks = cfg.task_names
    trial_cfg = trial_config(cfg)
    all_callbacks = [_run_closer(uri, parent, cfg.train.max_steps)] + list(callbacks or [])
    tuner = _tuner(cfg, _trainable(trial_cfg, trainer_factory, parent, folder, STAGE_TRIAL), folder,
                   all_callbacks, resume, max_concurrent=n_concurrent)
    grid = _fit(tuner, _experiment(folder), uri, parent)
    if parent:
        _close_runs(uri, parent)  # anything a killed trial left open
    reap_orphan_placement_groups()
    table = pd.DataFrame([_trial_row(r, tasks, cfg.train.max_steps, budget) for r in grid])
    if not table["objective"].notna().any():
        raise RuntimeError(f"no trial reported an objective; see {storage.join(folder.where, EXPERIMENT)}")
    best, best_metrics = _best(grid, table, tasks)
    print(f"[tune] best trial {best['trial_id']}: objective {best['objective']:.4f} at step {best['best_step']}, "
          f"lr {best['lr']:.3g}" + "".join(f", λ {t} {w:.2f}" for t, w in (best.get("task_weights") or {}).items()),
          flush=True)
    equal = None
    if cfg.tune.compare_equal and len(tasks) > 1:
        best_config = grid.get_best_result(metric=METRIC, mode=MODE, scope="all").config
        equal = _compare_equal(cfg, trial_cfg, trainer_factory, best_config, best, folder, parent, uri,
                               all_callbacks, resume, budget)
    # Ray reports a checkpoint as a path on the storage filesystem: a URI names it in object storage
    result = SweepResult(sweep_dir=folder.local, best=best,
                         best_checkpoint=storage.uri_of(folder.where, best_metrics[CHECKPOINT_PATH]),
                         best_metrics=best_metrics, table=table, parent_run_id=parent, max_t=budget,
                         max_concurrent_trials=n_concurrent, equal_weights=equal, remote=folder.remote)
    result.shown_table().to_csv(folder.local / "sweep_table.csv", index=False)
    _plot(table, tasks, folder.local / "sweep.png")
    folder.sync()
    return result


def _compare_equal(cfg: RunConfig, trial_cfg: RunConfig, trainer_factory: TrainerFactory,
                   best_config: dict[str, Any], best: dict[str, Any], folder: RunFolder, parent: str | None,
                   uri: str, callbacks: list, resume: bool, budget: int) -> dict[str, Any] | None:
    """One full-budget trial with every λ = 1 at the best trial's lr (``tune.compare_equal``)."""
    tasks = cfg.task_names
    eq_tuner = _tuner(cfg, _trainable(trial_cfg, trainer_factory, parent, folder, STAGE_EQUAL), folder,
                      callbacks, resume, name=EQUAL_EXPERIMENT, param_space=equal_weights_config(best_config, tasks),
                      num_samples=1, asha=False)
    eq_grid = _fit(eq_tuner, _experiment(folder, EQUAL_EXPERIMENT), uri, parent)
    row = _trial_row(eq_grid[0], tasks, cfg.train.max_steps, budget)
    if row["objective"] != row["objective"]:  # NaN: the trial reported nothing
        return None
    equal = {"trial_id": row["trial_id"], "lr": row["lr"], "objective": row["objective"],
             "best_step": int(row["best_step"]), "best_minus_equal": best["objective"] - row["objective"]}
    print(f"[tune] equal weights at lr {equal['lr']:.3g}: objective {equal['objective']:.4f} "
          f"(best tuned {best['objective']:.4f}, difference {equal['best_minus_equal']:+.4f})", flush=True)
    return equal


def _print_result(result: SweepResult) -> None:
    shown = result.shown_table()
    brief = ["trial_id", "lr", *[c for c in shown.columns if c.startswith("lambda/")],
             *[k for k in OPTIONAL if k in shown.columns], "objective", "best_step", "iterations", "stopped_early"]
    print(shown[brief].to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    print(f"[tune] done in {result.wall_s}s: {result.trials} trials, {result.stopped_early} stopped early by ASHA; "
          f"best checkpoint {result.best_checkpoint}", flush=True)
