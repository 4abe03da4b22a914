"""MLflow runs without Ray: the store, the experiment, a run holding the whole resolved config.

Shared by the training driver (``pipelines``) and the sweep (``tune``), which opens one child run
per trial; publishing (reports, plots, model card, model, registry) is ``pipelines.tracking``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtl.config import RunConfig


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` relative to the working directory -> an absolute path, so Ray workers
    (whose working directory differs) write to the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def setup(cfg: RunConfig):
    """Point MLflow at the config's store and experiment; returns (mlflow, experiment_id)."""
    import mlflow

    uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(cfg.mlflow.experiment)
    return mlflow, exp_id


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "5e-05", "tasks.0.name": "intent", ...} (values ≤ 500 chars)."""
    out: dict[str, str] = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def start_run(cfg: RunConfig, run_name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, extra_params: dict[str, Any] | None = None) -> str:
    """Create a run holding the whole resolved config as params; returns its id (left open)."""
    from mlflow.tracking import MlflowClient

    mlflow, exp_id = setup(cfg)
    client = MlflowClient()
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
    params = flat_params(cfg.to_dict())
    params.update({k: str(v)[:500] for k, v in (extra_params or {}).items()})
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 90):
        client.log_batch(run.info.run_id, params=items[i:i + 90])
    import yaml

    client.log_text(run.info.run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status)
