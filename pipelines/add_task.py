"""Grow a trained multi-task model by new tasks without moving the ones it has.

    mtl-ray add-task --base models:/mtl-ray-quick@champion --config new_task.yaml [k.sub=v]
    mtl-ray add-task --base runs/quick/train-x/model --config new_task.yaml --no-register

The config is an ordinary run config whose ``tasks:`` lists only the new task(s). The base (a
registry model, ``runs:/``, an artifact folder or an object-storage URI) gives the encoder, the
tokenizer and every old head; ``model.encoder`` in the config is replaced by the base's. Each
worker loads the base, adds the new heads (seeded), freezes the encoder and the old heads, and
trains the new heads on Ray Train like any run (``pipelines.train``: ``LoopConfig.base_model_dir``
and ``trainable_tasks``). Before publishing, the best checkpoint is checked against the base: every
encoder and old-head tensor equal, every old task's ``TaskInfo`` (labels, temperature, max_length)
equal; the base's ``encoder/`` and ``tokenizer/`` files are then copied in, so they are the base's
bytes. Publishing is ``pipelines.publish.publish_model`` on the new tasks' data (test sets, their
calibration, card, MLflow model, registry). The MLflow run is a child of the base version's run.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mtl import storage
from mtl.config import ConfigError, RunConfig
from mtl.readers import TaskData
from pipelines.publish import MODEL_DIR, RunResult

BASE_FILE = "base.json"  # the reference given and the version it was pinned to, for --resume
_MODEL = re.compile(r"^models:/(?P<name>[^/@]+)[/@]")
_RUN = re.compile(r"^runs:/(?P<run_id>[^/]+)/")


class ExtensionError(RuntimeError):
    """The grown model does not hold the base's encoder and old heads unchanged."""


@dataclass
class Base:
    """The model being grown: the reference as given, the artifact here, and where it came from."""

    reference: str
    local_dir: Path
    version: str | None = None  # the registry version (models:/ references)
    registered_name: str | None = None
    run_id: str | None = None  # the MLflow run that logged it (models:/ and runs:/ references)

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        from mtl.model import read_manifest

        return {t["name"]: t for t in read_manifest(self.local_dir)["tasks"]}


def resolve_base(reference: str, tracking_uri: str, dst: Path) -> Base:
    """Fetch the base artifact (into ``dst`` for MLflow references) and find its registry version
    and MLflow run. An alias is pinned to the version it names now."""
    from mtl.registry import local_artifact, pinned, registry_version

    model = _MODEL.match(reference)
    if model:
        from mlflow.tracking import MlflowClient

        version = registry_version(reference, tracking_uri)
        local = local_artifact(pinned(reference, version), tracking_uri, dst=str(dst))
        mv = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version(model["name"], version)
        return Base(reference, local, version, model["name"], mv.run_id)
    run = _RUN.match(reference)
    local = local_artifact(reference, tracking_uri, dst=str(dst) if run else None)
    return Base(reference, local, run_id=run["run_id"] if run else None)


def resumed_base(folder, given: str) -> str:
    """The base an add-task run started from, pinned (``models:/<name>/<version>`` for a registry
    reference), as recorded in its folder; ``given`` must be the reference it was started with."""
    folder.fetch(BASE_FILE)
    path = folder.local / BASE_FILE
    if not path.exists():
        raise FileNotFoundError(f"--resume: {folder.where} holds no {BASE_FILE}: it is not an add-task run")
    recorded = json.loads(path.read_text())
    if recorded["given"] != given:
        raise ConfigError(f"--base: {given!r} but the run being resumed ({folder.where}) grew {recorded['given']!r}; "
                          "resume with the same --base")
    print(f"[add-task] resuming {folder.where} on {recorded['pinned']} (the base it started from)", flush=True)
    return recorded["pinned"]


def check_new_tasks(cfg: RunConfig, base: Base) -> None:
    """The config's tasks must all be new to the base (refused naming the field otherwise)."""
    old = base.tasks
    clashes = [f"tasks.{i}.name: {t.name!r} is already a task of the base model {base.reference} "
               f"(it has {sorted(old)}); add-task adds new tasks only, choose another name"
               for i, t in enumerate(cfg.tasks) if t.name in old]
    if clashes:
        raise ConfigError("; ".join(clashes))


def check_extension(base_dir: Path, new_dir: Path, new_tasks: list[str]) -> None:
    """``new_dir`` holds the base's encoder and old heads tensor for tensor, the base's old
    ``TaskInfo`` entries as they were, and the new tasks; raises ``ExtensionError`` naming what differs."""
    from mtl.model import MultiTaskModel

    base, _ = MultiTaskModel.load(base_dir, "cpu")
    grown, _ = MultiTaskModel.load(new_dir, "cpu")
    want = list(base.tasks) + list(new_tasks)
    if sorted(grown.tasks) != sorted(want):
        raise ExtensionError(f"the grown model has tasks {list(grown.tasks)}, expected {want}")
    problems = [f"task {t!r}: {asdict(grown.tasks[t])} != base {asdict(info)}"
                for t, info in base.tasks.items() if asdict(grown.tasks[t]) != asdict(info)]
    ours = grown.state_dict()
    for k, v in base.state_dict().items():
        if not torch.equal(ours[k], v):
            problems.append(f"{k} differs from the base")
    if problems:
        raise ExtensionError("the grown model changed the base: " + "; ".join(problems[:10]))


def stage_artifact(checkpoint, base_dir: Path, dest: Path, new_tasks: list[str]) -> Path:
    """The checkpoint's model, checked against the base, with the base's own encoder and tokenizer
    files, as ``dest/model``; returns ``dest`` (a folder ``Checkpoint.from_directory`` can take)."""
    shutil.rmtree(dest, ignore_errors=True)
    with checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / MODEL_DIR, dest / MODEL_DIR)
    check_extension(base_dir, dest / MODEL_DIR, new_tasks)
    for part in ("encoder", "tokenizer"):
        shutil.rmtree(dest / MODEL_DIR / part)
        shutil.copytree(base_dir / part, dest / MODEL_DIR / part)
    return dest


def add_task(cfg: RunConfig, base: str, register: bool = True, data: dict[str, TaskData] | None = None,
             resume: bool = False) -> RunResult:
    """Train the config's (new) tasks' heads on the frozen base model and publish base + new heads
    as a new model (a ``RunResult``, mode "train"). With MLflow on and ``register``, the result is
    a new version of ``mlflow.registered_model`` (default: the base's registered name) and
    ``champion`` points at it. ``resume`` continues the latest add-task run of this name from its
    last checkpoint, on the base it started from (an alias is not looked up again: it may have
    moved, for instance to this run's own first result)."""
    from ray.train import Checkpoint

    from pipelines import publish, tracking
    from pipelines.data import read_tasks
    from pipelines.ray_utils import check_resources, init_ray, required_cpus
    from pipelines.sharding import train_datasets
    from pipelines.train import build_trainer, check_train_config, make_loop_config

    check_train_config(cfg)
    t0 = time.time()
    folder = publish.run_dir(cfg, resume=resume)
    folder.local.mkdir(parents=True, exist_ok=True)
    uri = tracking.absolute_tracking_uri(cfg.mlflow.tracking_uri)
    fetched = Path(tempfile.mkdtemp(prefix="mtl-ray-base-")) / "base"  # not in the run folder, which is synced
    given = base
    if resume:
        base = resumed_base(folder, base)
    try:
        found = resolve_base(base, uri, fetched)
        check_new_tasks(cfg, found)
    except Exception:
        shutil.rmtree(fetched.parent, ignore_errors=True)
        if not resume:
            shutil.rmtree(folder.local, ignore_errors=True)
        raise
    if not resume:
        pin = f"models:/{found.registered_name}/{found.version}" if found.version else base
        (folder.local / BASE_FILE).write_text(json.dumps({"given": given, "pinned": pin}))
    mlflow_cfg = cfg.mlflow
    if "registered_model" not in mlflow_cfg.model_fields_set and found.registered_name:
        mlflow_cfg = mlflow_cfg.model_copy(update={"registered_model": found.registered_name})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"encoder": str(found.local_dir / "encoder")}),
                                 "mlflow": mlflow_cfg})
    new = cfg.task_names
    data = data or read_tasks(cfg)
    init_ray(min_cpus=required_cpus(cfg))
    check_resources(cfg)
    run_id = None
    if resume and cfg.mlflow.enabled and (folder.local / publish.RUN_ID_FILE).exists():
        tracking.setup(cfg)
        run_id = (folder.local / publish.RUN_ID_FILE).read_text().strip()
    elif cfg.mlflow.enabled:
        tags = {"mtl_ray.stage": "add-task", "mtl_ray.base_model": base,
                "mtl_ray.new_tasks": ",".join(new), "mtl_ray.frozen_tasks": ",".join(found.tasks)}
        if found.version:
            tags["mtl_ray.base_model_version"] = str(found.version)
        run_id = tracking.start_run(cfg, f"{cfg.name}/add-task/{folder.name}", parent_run_id=found.run_id, tags=tags)
        (folder.local / publish.RUN_ID_FILE).write_text(run_id)
    folder.sync()  # base.json and the run id, for a --resume on another machine
    shown = f"{base} (version {found.version})" if found.version else base
    print(f"[add-task] {shown}: tasks {list(found.tasks)} frozen; training {new} on "
          f"{cfg.train.num_workers} worker(s), outputs in {folder.where}", flush=True)
    loop = make_loop_config(cfg, data, run_id, base_model_dir=str(found.local_dir), trainable_tasks=new)
    storage_path, storage_fs = folder.storage()
    trainer = build_trainer(cfg, loop, train_datasets(cfg, data, loop.tokenizer_dir), run_name="ray",
                            storage_path=storage_path, storage_filesystem=storage_fs)
    try:
        result = trainer.fit()
        fit_s = time.time() - t0
        ckpt, best = publish.best_checkpoint(result)
        staged = stage_artifact(ckpt, found.local_dir, folder.local / "staged", new)
        published = publish.publish_model(
            cfg, Checkpoint.from_directory(str(staged)), data, folder.local / MODEL_DIR, run_id,
            {"base model": shown, "frozen (unchanged) tasks": ", ".join(found.tasks), "new tasks": ", ".join(new),
             "best step": best.get("step"), "training wall time (s)": round(fit_s, 1)},
            register and cfg.mlflow.enabled,
            description=f"add-task: {', '.join(new)} added to {shown}; the encoder and the heads of "
                        f"{', '.join(found.tasks)} are the base's, unchanged")
        check_extension(found.local_dir, published.model_dir, new)  # calibration touched only the new tasks
    except Exception:
        if run_id:
            tracking.end_run(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(folder.local / "staged", ignore_errors=True)
        shutil.rmtree(fetched.parent, ignore_errors=True)
    last = result.metrics or {}
    run = publish.record(RunResult(
        mode="train", run_dir=folder.where,
        model_dir=storage.join(folder.remote, MODEL_DIR) if folder.remote else str(published.model_dir),
        mlflow_run_id=run_id, best_step=best.get("step"), best_objective=best.get("objective"),
        steps=last.get("step"), stopped_early=bool(last.get("stopped_early", 0)),
        samples_per_s=last.get("samples_per_s"), wall_s=round(time.time() - t0, 1), fit_s=round(fit_s, 1),
        test_metrics=published.test_metrics, history=publish.history(result), model_uri=published.model_uri,
        registered_version=published.registered_version, calibration=published.calibration,
    ), folder.local)
    folder.sync()
    return run
