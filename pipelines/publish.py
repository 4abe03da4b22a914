"""After a fit: best checkpoint -> test sets -> run folder -> MLflow (reports, plots, card, model,
registry). Driver work only; nothing here runs on a training worker.

    result = trainer.fit()
    run = publish(cfg, result, data, run_dir, mlflow_run_id, register_model=True)
    run.test_metrics, run.model_uri, run.history        # a RunResult (mode "train")

A sweep's winner goes through the same ``publish_model`` and ``record`` (``pipelines.tuning.publish_sweep``):
a ``RunResult`` with mode "sweep" and its ``SweepSummary``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from mtl import storage
from mtl.config import RunConfig
from mtl.readers import SPLITS, TaskData
from mtl.storage import RunFolder

MODEL_DIR = "model"  # the artifact inside every checkpoint


@dataclass
class SweepSummary:
    """A sweep's own record, beside its winner's fields in ``RunResult``. ``best`` is the best trial:
    ``trial_id``, ``lr``, ``task_weights``, the optional knobs it sampled, ``objective``, ``best_step``,
    ``iterations`` (and, once registered, ``mlflow_run_id`` of its child run). ``table`` (a pandas
    DataFrame, one row per trial) is for callers only: it is not part of ``summary()``."""

    best: dict[str, Any]
    best_checkpoint: str  # the best trial's best Ray Train checkpoint
    trials: int
    trials_stopped_early: int  # trials ASHA stopped before the budget
    errors: int
    max_t: int  # ASHA's budget in evaluations
    max_concurrent_trials: int
    equal_weights: dict[str, Any] | None = None  # with tune.compare_equal: the λ = 1 trial's objective
    table: Any = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "table"}


@dataclass
class RunResult:
    """What one training run (``mode="train"``) or one sweep (``mode="sweep"``) produced: the
    published model of the best checkpoint and its test metrics. ``run_dir`` is the output folder
    (``train-<time>`` or ``sweep-<time>``), ``mlflow_run_id`` the run the model is logged on (the
    sweep's parent run). ``history`` holds one record of scalar metrics per evaluation of a training
    run (step, objective, val/<task>/<metric>, train/loss/<task>, lr, samples_per_s, ...); a sweep's
    own record is ``sweep``."""

    mode: Literal["train", "sweep"]
    run_dir: str
    model_dir: str
    mlflow_run_id: str | None
    best_step: int | None
    best_objective: float | None
    steps: int | None  # the last step trained (None for a sweep)
    stopped_early: bool  # the (winning) run stopped on ``train.patience``
    samples_per_s: float | None
    wall_s: float
    fit_s: float
    test_metrics: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    model_uri: str | None = None
    registered_version: str | None = None
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)  # per task: temperature, ECE before/after
    sweep: SweepSummary | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the history and the sweep's table, as summary.json holds it; a sweep's
        fields are at the top level, with ``sweep_dir`` and ``parent_run_id`` naming its folder and run."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("history", "sweep")}
        if self.sweep is not None:
            out.update(self.sweep.summary(), sweep_dir=self.run_dir, parent_run_id=self.mlflow_run_id)
        return out


def run_dir(cfg: RunConfig, resume: bool) -> RunFolder:
    """``output_dir/name/train-<time>``; with ``resume``, the latest such folder (local, or in object
    storage: then its driver files are fetched into the staging folder)."""
    stamp = time.strftime("train-%Y%m%d-%H%M%S")
    if not storage.is_remote(cfg.output_dir):
        root = Path(cfg.output_dir).resolve() / cfg.name
        if resume:
            runs = sorted(p for p in root.glob("train-*") if p.is_dir())
            if not runs:
                raise FileNotFoundError(f"--resume: no earlier run under {root}")
            return RunFolder(runs[-1])
        return RunFolder(root / stamp)
    root = storage.join(cfg.output_dir, cfg.name)
    if resume:
        runs = storage.list_dirs(root, "train-")
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier run under {root}")
        stamp = runs[-1]
    folder = RunFolder.staged(storage.join(root, stamp), cfg.name)
    if resume:
        folder.fetch(RUN_ID_FILE)
    return folder


RUN_ID_FILE = "mlflow_run_id"


def open_run(cfg: RunConfig, folder: RunFolder, resume: bool) -> str | None:
    """The MLflow run of this run folder: the one recorded there when resuming, else a new one."""
    from pipelines import tracking

    if not cfg.mlflow.enabled:
        return None
    id_file = folder.local / RUN_ID_FILE
    if resume and id_file.exists():
        tracking.setup(cfg)
        return id_file.read_text().strip()
    run_id = tracking.start_run(cfg, f"{cfg.name}/{folder.name}", tags={"mtl_ray.stage": "train"})
    id_file.write_text(run_id)
    folder.sync()
    return run_id


def best_checkpoint(result) -> tuple[Any, dict[str, Any]]:
    """(checkpoint, metrics) with the highest objective among those Ray kept; the latest when no
    kept checkpoint has an objective."""
    best = result.get_best_checkpoint("objective", "max") if result.best_checkpoints else None
    if best is None:
        if result.checkpoint is None:
            raise RuntimeError("the run reported no checkpoint")
        return result.checkpoint, result.metrics or {}
    metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    return best, metrics


def history(result) -> list[dict[str, float]]:
    """Every evaluation's metrics: rank 0's return value (the engine's history, which survives
    restarts in the checkpoint); else the kept checkpoints' rows of ``metrics_dataframe``."""
    if result.return_value:
        return list(result.return_value)
    df = result.metrics_dataframe
    return [] if df is None else df.sort_values("step").to_dict("records")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _evaluate_remote(files: dict[str, bytes], rows: dict[str, list[dict]], batch_size: int, threads: int,
                     validation: dict[str, list[dict]] | None = None):
    """Test report of the artifact whose ``files`` are shipped here (the task may run on another
    node than the driver's folder: on Kubernetes it does); with ``validation``, first fit its
    temperatures there. Returns the report, the calibration and the files that changed: the
    manifest (temperatures) and the reliability diagrams on the test sets."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mtl-evaluate-") as tmp:
        model_dir = Path(tmp) / "model"
        for name, data in files.items():
            (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (model_dir / name).write_bytes(data)
        report, calibration = _evaluate_local(str(model_dir), rows, batch_size, threads, validation)
        changed = {"model/manifest.json": (model_dir / "manifest.json").read_bytes()}
        plots = Path(tmp) / "calibration"
        changed.update({f"calibration/{f.name}": f.read_bytes() for f in sorted(plots.glob("*"))} if plots.exists() else {})
        for res in calibration.values():
            if "plot" in res:
                res["plot"] = f"calibration/{Path(res['plot']).name}"
    return report, calibration, changed


def _evaluate_local(model_dir: str, rows: dict[str, list[dict]], batch_size: int, threads: int,
                    validation: dict[str, list[dict]] | None = None):
    """Test report of the artifact in ``model_dir``; with ``validation``, first fit its temperatures
    there (written to the manifest; reliability diagrams on the test sets: ``../calibration``)."""
    import ray

    from mtl.calibration import calibrate, write_temperatures
    from mtl.evaluation import test_report
    from mtl.model import MultiTaskModel
    from pipelines.sources import as_rows

    rows = {t: as_rows(r) for t, r in rows.items()}
    validation = {t: as_rows(r) for t, r in validation.items()} if validation else validation
    torch.set_num_threads(max(1, threads))
    # the GPU only when Ray assigned one (Ray no longer hides GPUs from num_gpus=0 tasks)
    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    model, tokenizer = MultiTaskModel.load(model_dir, device)
    calibration = {}
    if validation:
        calibration = calibrate(model, tokenizer, validation, rows, batch_size,
                                plots=Path(model_dir).parent / "calibration")
        write_temperatures(model_dir, {t: r["temperature"] for t, r in calibration.items()})
    return test_report(model, tokenizer, rows, batch_size), calibration


def evaluate_test(cfg: RunConfig, model_dir: str | Path, data: dict[str, TaskData], split: str = "test",
                  calibrate: bool = False):
    """Each task's metrics, report and confusion matrix on ``split``, computed in a Ray task that gets
    a worker's resources (a GPU when training had one). Returns ``(report, calibration)``; with
    ``calibrate``, temperatures are fitted on the validation split first (else ``calibration`` is {})."""
    import ray

    from pipelines.ray_utils import resolve_use_gpu

    use_gpu = resolve_use_gpu(cfg)
    fn = ray.remote(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if use_gpu else 0)(_evaluate_remote)
    from pipelines.sources import split_rows

    # row lists, or the Ray Datasets of sources read where they lie (read inside the task)
    rows = {t: split_rows(d, split) for t, d in data.items()}
    validation = {t: split_rows(d, "validation") for t, d in data.items()} if calibrate else None
    report, calibration, changed = ray.get(fn.remote(ray.put(_files(Path(model_dir))), rows, cfg.train.eval_batch_size,
                                                     int(cfg.train.cpus_per_worker), validation))
    parent = Path(model_dir).parent
    for name, data in changed.items():  # the fitted temperatures and the diagrams, back beside the model
        dst = Path(model_dir) / name.removeprefix("model/") if name.startswith("model/") else parent / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
    for res in calibration.values():
        if "plot" in res:
            res["plot"] = str(parent / res["plot"])
    return report, calibration


@dataclass
class Published:
    """What the publishing stage made of a checkpoint: the model folder (calibrated), its test
    report and calibration per task, and (with MLflow) the logged model and registered version."""

    model_dir: Path
    test: dict[str, dict[str, Any]]
    calibration: dict[str, dict[str, Any]]
    model_uri: str | None = None
    registered_version: str | None = None

    @property
    def test_metrics(self) -> dict[str, dict[str, float]]:
        return {t: r["metrics"] for t, r in self.test.items()}


def publish_model(cfg: RunConfig, checkpoint, data: dict[str, TaskData], dest: Path, run_id: str | None,
                  card_extra: dict[str, Any], register: bool, description: str | None = None) -> Published:
    """The one publishing stage of training and of a sweep: the checkpoint's model -> ``dest``;
    temperatures fitted on validation (``train.calibrate``); test sets; with an MLflow run: test
    reports and confusion plots, calibration (temperature, ECE before/after on test, reliability
    diagrams), the model card, the pyfunc model, and (``register``) the registry's ``champion``."""
    shutil.rmtree(dest, ignore_errors=True)
    with checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / MODEL_DIR, dest)
    test, calibration = evaluate_test(cfg, dest, data, calibrate=cfg.train.calibrate)
    out = Published(dest, test, calibration)
    for t, c in calibration.items():
        print(f"[publish] {t}: temperature {c['temperature']:.3f}, test ECE {c.get('test_ece_before', 0):.4f} -> "
              f"{c.get('test_ece_after', 0):.4f} (a perfectly calibrated model: {c.get('test_ece_floor', 0):.4f})", flush=True)
    if run_id:
        from mlflow.tracking import MlflowClient

        from pipelines import tracking

        client = MlflowClient()
        tracking.log_test_results(run_id, test)
        for t, c in calibration.items():
            for k in ("temperature", "test_ece_before", "test_ece_after", "test_ece_floor", "validation_ece_before",
                      "validation_ece_after"):
                if k in c:
                    client.log_metric(run_id, f"calibration/{t}/{k}", float(c[k]))
            if c.get("plot"):
                client.log_artifact(run_id, c["plot"], "plots")
        sizes = {t: {s: d.size(s) for s in SPLITS} for t, d in data.items()}
        client.log_text(run_id, tracking.model_card(cfg, test, sizes, card_extra), "model_card.md")
        out.model_uri = tracking.log_model(run_id, dest)
        if register:
            out.registered_version = tracking.register(out.model_uri, cfg.mlflow.registered_model, test,
                                                       description=description)
    return out


def record(run: RunResult, folder: Path | None = None) -> RunResult:
    """The common end of training and of a sweep: ``summary.json`` (and a training run's
    ``history.jsonl``) in the output folder; with MLflow, ``wall_s``, ``fit_s`` and the summary on
    the run (a training run is then closed: a sweep's parent was closed by the sweep)."""
    if run.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        from pipelines import tracking

        client = MlflowClient()
        for k in ("wall_s", "fit_s"):
            client.log_metric(run.mlflow_run_id, k, getattr(run, k))
        tracking.log_summary(run.mlflow_run_id, run.summary())
        if run.mode == "train":
            tracking.end_run(run.mlflow_run_id)
    folder = folder or Path(run.run_dir)
    (folder / "summary.json").write_text(json.dumps(run.summary(), indent=2, default=str))
    if run.mode == "train":
        (folder / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in run.history))
    best = f"{run.best_objective:.4f}" if run.best_objective is not None else "n/a"
    print(f"[{run.mode}] done in {run.wall_s}s; best objective {best} at step {run.best_step}; "
          "test: " + ", ".join(f"{t} " + " ".join(f"{k}={v:.4f}" for k, v in m.items())
                               for t, m in run.test_metrics.items()), flush=True)
    return run


def publish(cfg: RunConfig, result, data: dict[str, TaskData], folder: RunFolder, mlflow_run_id: str | None,
            register_model: bool = False, started: float | None = None, fit_s: float = 0.0) -> RunResult:
    """A training run's result: its best checkpoint through ``publish_model`` (``folder/model``, test
    sets, MLflow), then ``record`` (summary.json, history.jsonl, the run's summary)."""
    ckpt, best = best_checkpoint(result)
    last = result.metrics or {}
    samples = last.get("samples_per_s")
    published = publish_model(cfg, ckpt, data, folder.local / MODEL_DIR, mlflow_run_id, {
        "best step": best.get("step"), "training wall time (s)": round(fit_s, 1),
        "samples/s": f"{samples:.1f}" if samples else "n/a"}, register_model)
    model_dir = storage.join(folder.remote, MODEL_DIR) if folder.remote else str(published.model_dir)
    run = record(RunResult(
        mode="train", run_dir=folder.where, model_dir=model_dir, mlflow_run_id=mlflow_run_id,
        best_step=best.get("step"), best_objective=best.get("objective"), steps=last.get("step"),
        stopped_early=bool(last.get("stopped_early", 0)), samples_per_s=samples,
        wall_s=round(time.time() - (started or time.time()), 1), fit_s=round(fit_s, 1),
        test_metrics=published.test_metrics, history=history(result), model_uri=published.model_uri,
        registered_version=published.registered_version, calibration=published.calibration,
    ), folder.local)
    folder.sync()  # model, reports, summary next to the checkpoints
    return run
