"""After a fit: best checkpoint -> test sets -> run folder -> MLflow (reports, plots, card, model,
registry). Driver work only; nothing here runs on a training worker.

    result = trainer.fit()
    run = publish(cfg, result, data, run_dir, mlflow_run_id, register_model=True)
    run.test_metrics, run.model_uri, run.history        # a RunResult
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl.config import RunConfig
from mtl.readers import SPLITS, TaskData

MODEL_DIR = "model"  # the artifact inside every checkpoint


@dataclass
class RunResult:
    """What one training run produced. ``history`` holds one record of scalar metrics per
    evaluation (step, objective, val/<task>/<metric>, train/loss/<task>, lr, samples_per_s, ...)."""

    run_dir: str
    model_dir: str
    mlflow_run_id: str | None
    best_step: int | None
    best_objective: float | None
    steps: int | None
    stopped_early: bool
    samples_per_s: float | None
    wall_s: float
    fit_s: float
    test_metrics: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    model_uri: str | None = None
    registered_version: str | None = None
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)  # per task: temperature, ECE before/after

    def summary(self) -> dict[str, Any]:
        """Everything but the history, as summary.json holds it."""
        return {k: v for k, v in asdict(self).items() if k != "history"}

    # Transitional: callers written for the old summary dict (pipelines/run.py) read keys.
    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def run_dir(cfg: RunConfig, resume: bool) -> Path:
    """``output_dir/name/train-<time>``; with ``resume``, the latest such folder."""
    root = Path(cfg.output_dir).resolve() / cfg.name
    if resume:
        runs = sorted(p for p in root.glob("train-*") if p.is_dir())
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier run under {root}")
        return runs[-1]
    return root / time.strftime("train-%Y%m%d-%H%M%S")


def open_run(cfg: RunConfig, folder: Path, resume: bool) -> str | None:
    """The MLflow run of this run folder: the one recorded there when resuming, else a new one."""
    from pipelines import tracking

    if not cfg.mlflow.enabled:
        return None
    id_file = folder / "mlflow_run_id"
    if resume and id_file.exists():
        tracking.setup(cfg)
        return id_file.read_text().strip()
    run_id = tracking.start_run(cfg, f"{cfg.name}/{folder.name}", tags={"mtl_ray.stage": "train"})
    id_file.write_text(run_id)
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


def _evaluate_remote(model_dir: str, rows: dict[str, list[dict]], batch_size: int, threads: int,
                     validation: dict[str, list[dict]] | None = None):
    """Test report of the artifact; with ``validation``, first fit its temperatures there (written
    to the manifest; reliability diagrams on the test sets beside the model: ``../calibration``)."""
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
    report, calibration = ray.get(fn.remote(str(model_dir), rows, cfg.train.eval_batch_size,
                                            int(cfg.train.cpus_per_worker), validation))
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
              f"{c.get('test_ece_after', 0):.4f}", flush=True)
    if run_id:
        from mlflow.tracking import MlflowClient

        from pipelines import tracking

        client = MlflowClient()
        tracking.log_test_results(run_id, test)
        for t, c in calibration.items():
            for k in ("temperature", "test_ece_before", "test_ece_after", "validation_ece_before", "validation_ece_after"):
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


def _log_run(run: RunResult) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines import tracking

    client = MlflowClient()
    for k in ("wall_s", "fit_s"):
        client.log_metric(run.mlflow_run_id, k, getattr(run, k))
    tracking.log_summary(run.mlflow_run_id, run.summary())
    tracking.end_run(run.mlflow_run_id)


def publish(cfg: RunConfig, result, data: dict[str, TaskData], folder: Path, mlflow_run_id: str | None,
            register_model: bool = False, started: float | None = None, fit_s: float = 0.0) -> RunResult:
    """Copy the best checkpoint's model to ``folder/model``, evaluate it on the test sets, write
    ``summary.json`` and ``history.jsonl`` (one line per evaluation) and, with an MLflow run, log reports, plots, card and model (and register it)."""
    ckpt, best = best_checkpoint(result)
    last = result.metrics or {}
    samples = last.get("samples_per_s")
    published = publish_model(cfg, ckpt, data, folder / MODEL_DIR, mlflow_run_id, {
        "best step": best.get("step"), "training wall time (s)": round(fit_s, 1),
        "samples/s": f"{samples:.1f}" if samples else "n/a"}, register_model)
    run = RunResult(
        run_dir=str(folder), model_dir=str(published.model_dir), mlflow_run_id=mlflow_run_id,
        best_step=best.get("step"), best_objective=best.get("objective"), steps=last.get("step"),
        stopped_early=bool(last.get("stopped_early", 0)), samples_per_s=samples,
        wall_s=round(time.time() - (started or time.time()), 1), fit_s=round(fit_s, 1),
        test_metrics=published.test_metrics, history=history(result), model_uri=published.model_uri,
        registered_version=published.registered_version, calibration=published.calibration,
    )
    if mlflow_run_id:
        _log_run(run)
    (folder / "summary.json").write_text(json.dumps(run.summary(), indent=2, default=str))
    (folder / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in run.history))
    print(f"[train] done in {run.wall_s}s; best objective {run.best_objective:.4f} at step {run.best_step}; "
          "test: " + ", ".join(f"{t} " + " ".join(f"{k}={v:.4f}" for k, v in m.items())
                               for t, m in run.test_metrics.items()), flush=True)
    return run
