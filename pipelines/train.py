"""Multi-task training on Ray Train: glue around ``mtl.engine``.

    mtl-ray train --config configs/quick.yaml                       # 1 worker, CPU or GPU as the cluster has
    mtl-ray train --config configs/quick.yaml train.num_workers=2   # DDP over 2 workers
    mtl-ray train --config configs/quick.yaml train.strategy=fsdp train.num_workers=2
    mtl-ray train --config configs/quick.yaml --resume              # continue the last run of this name

Each worker streams its own shard of every task's training split (``pipelines.sharding``: Ray Train's
streaming split, ``train.data_sharding: streaming``; a local shuffle buffer, re-iterated per
epoch) and reads its shard of each validation split once; no worker holds a whole split. With
``data_sharding: replicated`` every worker holds every split instead. Each worker builds
the model (from the encoder, or from the checkpoint being resumed), wraps it (DDP through
``prepare_model``, or FSDP2) and hands everything to the ``Engine``, which knows nothing of Ray.
Two callbacks connect it back: ``ReportToRay`` checkpoints (artifact + engine state) through
``ray.train.report`` at every evaluation, and ``ProgressLog`` (``pipelines.progress``) writes
rank 0's MLflow curves and progress lines. The driver side (best checkpoint, test sets, MLflow, card) is ``pipelines.publish``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl.config import RunConfig
from mtl.engine import Callback, Engine, EngineConfig
from mtl.model import MultiTaskModel, TaskInfo
from mtl.readers import TaskData
from pipelines.progress import MlflowWriter, ProgressLog
from pipelines.publish import MODEL_DIR, RunResult, best_checkpoint, evaluate_test  # noqa: F401 (re-exported)
from pipelines.ray_utils import resolve_use_gpu  # noqa: F401 (re-exported for tune/sweep.py)

TRAIN_STATE = "train_state.pt"


@dataclass
class LoopConfig:
    """Everything a worker needs, as plain values (no Ray objects). The optional hyperparameters
    override ``cfg.train`` (Tune sets them per trial); ``callbacks`` are extra engine callbacks
    (tests attach fault injection here)."""

    cfg: RunConfig
    tasks: list[TaskInfo]
    encoder_dir: str
    tokenizer_dir: str
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    lr: float | None = None
    head_lr: float | None = None
    task_weights: dict[str, float] | None = None
    warmup_ratio: float | None = None
    batch_size: int | None = None
    temperature: float | None = None
    callbacks: list[Callback] = field(default_factory=list)
    train_sizes: dict[str, int] = field(default_factory=dict)  # rows of each input's training split (cfg.inputs)
    # add-task (pipelines.add_task): the model is this artifact (a path every worker can read) plus
    # heads for ``tasks``; only ``trainable_tasks``' heads train (None: the whole model trains)
    base_model_dir: str | None = None
    trainable_tasks: list[str] | None = None

    def engine_config(self) -> EngineConfig:
        weights = self.task_weights or {t.name: t.weight for t in self.cfg.tasks}
        return EngineConfig.from_train(self.cfg.train, task_weights=weights, lr=self.lr, head_lr=self.head_lr,
                                       warmup_ratio=self.warmup_ratio, batch_size=self.batch_size,
                                       temperature=self.temperature)


class ReportToRay(Callback):
    """At each evaluation: the model artifact and the engine's state as a Ray Train checkpoint
    (written by rank 0), and the scalar metrics, through ``ray.train.report``."""

    def __init__(self, tokenizer_dir: str):
        self.tokenizer_dir = tokenizer_dir

    def on_evaluate(self, engine: Engine, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        from pipelines.data import cached_tokenizer

        state = engine.state_dict()  # a collective under FSDP: every rank
        report = {k: v for k, v in metrics.items() if k != "validation"}
        if engine.rank != 0:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory(prefix="mtl-ckpt-") as d:
            engine.raw.model.save(Path(d) / MODEL_DIR, cached_tokenizer(self.tokenizer_dir), state_dict=state.pop("model"),
                                  extra={"step": step, "validation": metrics["validation"]})
            torch.save(state, Path(d) / TRAIN_STATE)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))


def _restore(checkpoint) -> tuple[MultiTaskModel, dict[str, Any]]:
    with checkpoint.as_directory() as d:
        model, _ = MultiTaskModel.load(Path(d) / MODEL_DIR, "cpu")
        state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=True)
    return model.train(), state


def train_loop_per_worker(loop: LoopConfig) -> list[dict[str, float]] | None:
    """Ray Train's per-worker function; returns the evaluation history on rank 0."""
    import ray.train
    import ray.train.torch

    from mtl.distributed import shard_fsdp
    from pipelines.sharding import worker_data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    tc = loop.cfg.train
    torch.set_num_threads(max(1, int(tc.threads_per_worker or tc.cpus_per_worker)))
    device = ray.train.torch.get_device()
    data = worker_data(loop)  # this worker's streamed shards (pipelines.sharding)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        model, state = _restore(checkpoint)
    elif loop.base_model_dir:
        model, state = MultiTaskModel.load(loop.base_model_dir, "cpu")[0].add_tasks(loop.tasks, seed=tc.seed).train(), None
    else:
        model, state = MultiTaskModel.from_encoder(loop.encoder_dir, loop.tasks, seed=tc.seed), None
    if loop.trainable_tasks is not None:  # also after a restore: a checkpoint does not record requires_grad
        model.freeze_except(loop.trainable_tasks)
    if tc.strategy == "fsdp":
        def wrap(m):
            return shard_fsdp(m, device)
    else:
        def wrap(m):
            return ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": False})
    rank = ray.train.get_context().get_world_rank()
    tracker = MlflowWriter(loop.mlflow_uri, loop.mlflow_run_id) if rank == 0 else MlflowWriter(None, None)
    callbacks = [ReportToRay(loop.tokenizer_dir), ProgressLog(tracker, tc.log_every), *loop.callbacks]
    engine = Engine(model, data, loop.engine_config(), device=device, wrap=wrap, callbacks=callbacks,
                    tasks=[t.name for t in loop.tasks], inputs=loop.cfg.inputs)
    if state:
        engine.load_state_dict(state)
    engine.fit()
    return engine.history if engine.rank == 0 else None


def check_train_config(cfg: RunConfig) -> None:
    """The config gate's rules (``mtl.config``), again for a config changed in code."""
    from mtl.config import check_config

    check_config(cfg)


def make_loop_config(cfg: RunConfig, data: dict[str, TaskData], mlflow_run_id: str | None = None,
                     **overrides: Any) -> LoopConfig:
    """The worker's ``LoopConfig``; ``overrides`` are LoopConfig fields (Tune's trial values, callbacks)."""
    from mtl.packages import resolve_encoder
    from pipelines.data import task_infos
    from pipelines.tracking import absolute_tracking_uri

    base = overrides.get("base_model_dir")  # add-task: the base artifact's encoder and tokenizer
    encoder = str(Path(base) / "encoder") if base else str(resolve_encoder(cfg.model.encoder))
    tokenizer = str(Path(base) / "tokenizer") if base else encoder
    return LoopConfig(cfg=cfg, tasks=task_infos(cfg, data), encoder_dir=encoder, tokenizer_dir=tokenizer,
                      train_sizes={i: data[ts[0]].size("train") for i, ts in cfg.inputs.items() if ts[0] in data},
                      mlflow_uri=absolute_tracking_uri(cfg.mlflow.tracking_uri) if cfg.mlflow.enabled else None,
                      mlflow_run_id=mlflow_run_id, **overrides)


def build_trainer(cfg: RunConfig, loop_config: LoopConfig, datasets: dict[str, Any], run_name: str,
                  storage_path: str, callbacks: list | None = None, storage_filesystem: Any = None):
    """A TorchTrainer for this config: gloo on CPU, nccl on GPU; restarts from the last checkpoint
    on worker failure (``train.max_failures``); keeps the best and the latest checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines import sharding
    from pipelines.ray_utils import check_resources, runtime_env

    tc = cfg.train
    check_resources(cfg)
    use_gpu = resolve_use_gpu(cfg)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=tc.placement_strategy),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="objective",
                                               checkpoint_score_order="max"),
            callbacks=callbacks or None,
            worker_runtime_env=runtime_env(),
        ),
        datasets=datasets,
        dataset_config=sharding.data_config(cfg, [t.name for t in loop_config.tasks]),
    )


def run_training(cfg: RunConfig, resume: bool = False, data: dict[str, TaskData] | None = None,
                 register_model: bool = False, callbacks: list[Callback] | None = None) -> RunResult:
    """Data -> fit -> ``publish`` (best checkpoint, test sets, MLflow). Outputs under
    ``output_dir/name/train-<time>/``; ``resume`` continues the latest such run from its last
    checkpoint (Ray Train restores a run of the same name and storage path). ``callbacks`` are
    extra engine callbacks for every worker (picklable)."""
    from pipelines import publish, tracking
    from pipelines.data import read_tasks
    from pipelines.ray_utils import check_resources, init_ray, required_cpus
    from pipelines.sharding import train_datasets

    check_train_config(cfg)
    data = data or read_tasks(cfg)  # fails before Ray on bad data
    init_ray(min_cpus=required_cpus(cfg))
    check_resources(cfg)  # before any folder, MLflow run or worker
    folder = publish.run_dir(cfg, resume)
    folder.local.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_id = publish.open_run(cfg, folder, resume)
    print(f"[train] {cfg.name}: {len(cfg.tasks)} tasks, {cfg.train.num_workers} worker(s), "
          f"{cfg.train.strategy}, outputs in {folder.where}", flush=True)
    loop = make_loop_config(cfg, data, run_id, callbacks=list(callbacks or []))
    storage_path, storage_fs = folder.storage()  # checkpoints: written by the workers, there
    trainer = build_trainer(cfg, loop, train_datasets(cfg, data), run_name="ray", storage_path=storage_path,
                            storage_filesystem=storage_fs)
    try:
        result = trainer.fit()
    except Exception:
        if run_id:
            tracking.end_run(run_id, "FAILED")
        raise
    return publish.publish(cfg, result, data, folder, run_id, register_model, started=t0, fit_s=time.time() - t0)

