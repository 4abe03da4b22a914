"""MLflow bookkeeping done by the driver: runs, params, test reports, plots, model card, registry.

Rank 0 of a training run logs its per-step metrics into the run the driver opened here
(``pipelines.train._Mlflow``); everything else is logged from the driver.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mtl.config import RunConfig
from mtl.tracking import absolute_tracking_uri, end_run, flat_params, setup, start_run

__all__ = ["CHAMPION", "absolute_tracking_uri", "confusion_png", "end_run", "flat_params", "log_model",
           "log_summary", "log_test_results", "model_card", "model_requirements", "register", "report_text", "setup", "start_run"]

CHAMPION = "champion"


def confusion_png(cm: list[list[int]], labels: list[str], title: str, path: Path) -> Path:
    """A row-normalised confusion matrix heat map with counts (rows: truth, columns: prediction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(cm, dtype=float)
    keep = (m.sum(0) + m.sum(1)) > 0
    m, labels = m[keep][:, keep], [lab for lab, k in zip(labels, keep) if k]
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if len(labels) <= 30:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_text(task: str, result: dict[str, Any]) -> str:
    lines = [f"# {task}: test set ({result['n']} examples)", ""]
    lines += [f"{k}: {v:.4f}" for k, v in result["metrics"].items()]
    if result["report"]:
        lines += ["", f"{'label':<40} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
        for label, r in result["report"].items():
            if isinstance(r, dict) and "f1" in r:
                lines.append(f"{label:<40} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1']:>9.4f} {r['support']:>8}")
            elif isinstance(r, dict) and "f1-score" in r:
                lines.append(f"{label:<40} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1-score']:>9.4f} {r['support']:>8}")
    return "\n".join(lines) + "\n"


def log_test_results(run_id: str, results: dict[str, dict[str, Any]], prefix: str = "test") -> None:
    """Per-task test metrics, classification reports (JSON and text) and confusion-matrix PNGs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for task, res in results.items():
        for k, v in res["metrics"].items():
            client.log_metric(run_id, f"{prefix}/{task}/{k}", float(v))
        client.log_dict(run_id, res["report"], f"reports/{task}.json")
        client.log_text(run_id, report_text(task, res), f"reports/{task}.txt")
        if res.get("confusion") is not None:
            with tempfile.TemporaryDirectory() as d:
                png = confusion_png(res["confusion"], res["labels"], f"{task} (test)", Path(d) / f"confusion_{task}.png")
                client.log_artifact(run_id, str(png), "plots")


def model_card(cfg: RunConfig, results: dict[str, dict[str, Any]], sizes: dict[str, dict[str, int]],
               extra: dict[str, Any] | None = None) -> str:
    lines = [f"# Model card: {cfg.mlflow.registered_model}", "",
             f"One `{cfg.model.encoder}` encoder shared by {len(cfg.tasks)} task heads, trained with mtl-ray "
             f"({cfg.train.strategy}, {cfg.train.sampling} sampling, {cfg.train.weighting} loss weighting).", "",
             "## Test metrics", "", "| task | kind | metric | value | test examples |", "|---|---|---|---|---|"]
    for t in cfg.tasks:
        res = results.get(t.name)
        if not res:
            continue
        for k, v in res["metrics"].items():
            lines.append(f"| {t.name} | {t.kind} | {k} | {v:.4f} | {res['n']} |")
    lines += ["", "## Data", "", "| task | source | train | validation | test |", "|---|---|---|---|---|"]
    for t in cfg.tasks:
        s = sizes.get(t.name, {})
        lines.append(f"| {t.name} | {t.source.type} | {s.get('train', '')} | {s.get('validation', '')} | {s.get('test', '')} |")
    if extra:
        lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in extra.items()]
    import yaml

    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


# What loading the pyfunc model imports: the ``mtl`` package (shipped as code with the model) and
# these distributions. mlflow-skinny is the part of MLflow that loads pyfunc models.
MODEL_REQUIREMENTS = ("mlflow-skinny", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                      "seqeval")


def model_requirements() -> list[str]:
    """``MODEL_REQUIREMENTS`` pinned to the versions installed here (local labels such as ``+cpu``
    dropped: ``torch==2.13.0`` is satisfied by the CPU and the CUDA builds alike)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+', 1)[0]}" for name in MODEL_REQUIREMENTS]


def log_model(run_id: str, artifact_dir: str | Path, name: str = "model") -> str:
    """Log the artifact as an MLflow pyfunc model (models from code) in ``run_id``; returns its URI.
    The model carries the ``mtl`` package as code and pins its requirements, so
    ``mlflow.pyfunc.load_model`` works in an environment holding only what it declares."""
    import warnings

    import mlflow

    import mtl
    import mtl.pyfunc_model as code

    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=code.__file__,
            artifacts={"mtl_model": str(artifact_dir)},
            code_paths=[str(Path(mtl.__file__).parent)],
            pip_requirements=model_requirements(),
        )
    return info.model_uri


def register(model_uri: str, name: str, metrics: dict[str, dict[str, Any]] | None = None,
             alias: str = CHAMPION, description: str | None = None) -> str:
    """Register ``model_uri`` under ``name``, point ``alias`` at it and tag it with test metrics;
    returns the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mv = mlflow.register_model(model_uri, name)
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, mv.version)
    for task, res in (metrics or {}).items():
        for k, v in res["metrics"].items():
            client.set_model_version_tag(name, mv.version, f"test.{task}.{k}", f"{v:.4f}")
    if description:
        client.update_model_version(name, mv.version, description=description[:5000])
    return mv.version


def log_summary(run_id: str, summary: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().log_text(run_id, json.dumps(summary, indent=2, default=str), "summary.json")
