"""Multi-task training on Ray Train.

    mtl-ray train --config configs/quick.yaml                       # 1 worker, CPU or GPU as the cluster has
    mtl-ray train --config configs/quick.yaml train.num_workers=2   # DDP over 2 workers
    mtl-ray train --config configs/quick.yaml train.strategy=fsdp train.num_workers=2
    mtl-ray train --config configs/quick.yaml --resume              # continue the last run of this name

Every worker holds its tasks' tokenized rows (from Ray Data via ``get_dataset_shard``) and draws
the same task sequence (``TaskSampler``) and the same global batches (``BatchStream``), taking its
own slice of each, so 1 worker and N workers at the same global batch train on the same examples.
One optimizer step = ``grad_accum`` micro-batches of each sampled task. Validation every
``eval_every`` steps, checkpoint (artifact + optimizer + scheduler + sampler position) through
``ray.train.report``; early stopping on the objective; rank 0 logs to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mtl.config import RunConfig
from mtl.evaluation import evaluate_arrays, flatten_metrics, objective, trim
from mtl.model import MultiTaskModel, TaskInfo
from mtl.readers import TaskData
from mtl.sampling import BatchStream, TaskSampler
from mtl.weighting import LossWeighting, pcgrad_combine
from pipelines.data import cached_tokenizer

# Worker progress goes through logging, not print: Ray Train V2 patches print on workers and tees it
# (once to its logger, once to the wrapped stdout), so every printed line reached the driver twice.
log = logging.getLogger("mtl.train")

TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"
EVAL_SPLITS = ("train", "validation")  # what workers load; the test pass runs after fit


# ---------------------------------------------------------------------------- the module


class TrainModule(nn.Module):
    """The model and its loss weighting in one module, so DDP/FSDP synchronise learned weights too.

    ``forward(batches)`` -> (weighted total loss, per-task losses); ``forward(batches, logits=True)``
    -> per-task logits. Heads (and log-variances) of tasks not in this step join the graph with a
    zero factor, so DDP needs no unused-parameter search."""

    def __init__(self, model: MultiTaskModel, weighting: LossWeighting):
        super().__init__()
        self.model = model
        self.weighting = weighting

    def forward(self, batches: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                logits: bool = False):
        out = {t: self.model(ids, mask, [t])[t] for t, (ids, mask, _) in batches.items()}
        if logits:
            return out
        losses = {t: self.model.kinds[t].loss(out[t], batches[t][2]) for t in batches}
        total = self.weighting(losses)
        unused = [p for t, h in self.model.heads.items() if t not in batches for p in h.parameters()]
        unused += self.weighting.unused_parameters(list(batches))
        if unused:
            total = total + 0.0 * sum(p.sum() for p in unused)
        return total, {t: v.detach() for t, v in losses.items()}


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def param_groups(module: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: encoder with/without decay at ``lr``; heads and loss weights at ``head_lr``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        head = ".heads." in f".{name}" or "weighting." in name
        no_decay = p.ndim < 2 or "LayerNorm" in name or "log_vars" in name
        groups.setdefault((head, no_decay), []).append(p)
    return [
        {"params": ps, "lr": head_lr if head else lr, "weight_decay": 0.0 if nd else weight_decay}
        for (head, nd), ps in sorted(groups.items())
    ]


# ---------------------------------------------------------------------------- worker side


def make_optimizer(module: nn.Module, lr: float, head_lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused where torch has the kernel (CPU, CUDA): one pass over all
    parameters instead of a loop of small ops. Same update rule; on the quiet 2-core dev CPU one
    MiniLM AdamW step took 11 ms fused against 66 ms foreach (a training step is about 1 s there)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(module, lr, head_lr, weight_decay), lr=lr, fused=fused)


def _materialize(iterator) -> dict[str, np.ndarray]:
    """All rows of a Ray Data iterator as numpy arrays, in ``idx`` order (deterministic)."""
    parts = list(iterator.iter_batches(batch_size=2048, batch_format="numpy"))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(out["idx"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def _shard_fsdp(module: TrainModule, device: torch.device) -> TrainModule:
    """FSDP2: each encoder layer is a shard unit, the rest (embeddings, heads) the root's."""
    from torch.distributed.fsdp import fully_shard

    module.to(device)
    layers = getattr(getattr(module.model.encoder, "encoder", None), "layer", None) or []
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def _full_state(module: nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The unsharded CPU state dict of the TrainModule (a collective under FSDP)."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    raw = module.module if hasattr(module, "module") else module
    return {k: v.detach().cpu() for k, v in raw.state_dict().items()}


def _optim_state(module: nn.Module, optimizer, strategy: str) -> dict:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _load_optim_state(module: nn.Module, optimizer, state: dict, strategy: str) -> None:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(module, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _all_mean(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Mlflow:
    """Rank 0's MLflow writer for a run the driver created (no-op without a run id)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.client = None
        self.run_id = run_id
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 900])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop. ``config`` is built by ``make_loop_config``; Tune may add
    ``lr``, ``task_weights`` (task -> λ), ``warmup_ratio``, ``batch_size`` and ``temperature``."""
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cfg = RunConfig.model_validate(config["cfg"])
    tc = cfg.train
    infos = [TaskInfo(**t) for t in config["tasks"]]
    names = [t.name for t in infos]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(tc.threads_per_worker or tc.cpus_per_worker)))
    device = ray.train.torch.get_device()
    strategy = tc.strategy

    lr = float(config.get("lr", tc.lr))
    head_lr = float(config.get("head_lr") or tc.head_lr or lr)
    batch_size = int(config.get("batch_size", tc.batch_size))
    warmup_ratio = float(config.get("warmup_ratio", tc.warmup_ratio))
    temperature = float(config.get("temperature", tc.temperature))
    weights = config.get("task_weights") or {t.name: t.weight for t in cfg.tasks}
    per_rank, rem = divmod(batch_size, world * tc.grad_accum)
    if rem or per_rank == 0:
        raise ValueError(f"train.batch_size {batch_size} must be a multiple of num_workers × grad_accum "
                         f"({world} × {tc.grad_accum})")
    micro = batch_size // tc.grad_accum  # global rows per micro-batch

    data = {t: {s: _materialize(ray.train.get_dataset_shard(f"{t}.{s}")) for s in EVAL_SPLITS} for t in names}
    sizes = [len(data[t]["train"]["idx"]) for t in names]

    # Model: from the pretrained encoder, or from the checkpoint being resumed.
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {}
    method = "static" if tc.weighting == "pcgrad" else tc.weighting
    weighting = LossWeighting(names, method, weights, tc.dwa_temperature)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model, _ = MultiTaskModel.load(Path(d) / MODEL_DIR, "cpu")
            state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=True)
        weighting.load_state_dict(state["weighting"])
        weighting.load_extra_state(state["weighting_extra"])
        model.train()
    else:
        model = MultiTaskModel.from_encoder(config["encoder_dir"], infos, seed=tc.seed)
    module: nn.Module = TrainModule(model, weighting)

    if strategy == "fsdp":
        module = _shard_fsdp(module, device)
    else:
        module = ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": False})
        if tc.comm_hook != "none" and isinstance(module, nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = default_hooks.fp16_compress_hook if tc.comm_hook == "fp16" else default_hooks.bf16_compress_hook
            module.register_comm_hook(None, hook)
    raw: TrainModule = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

    optimizer = make_optimizer(module, lr, head_lr, tc.weight_decay, device)
    warmup = int(warmup_ratio * tc.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, tc.max_steps))
    if state:
        _load_optim_state(module, optimizer, state["optimizer"], strategy)
        scheduler.load_state_dict(state["scheduler"])

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 and device.type == "cuda" else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    sampler = TaskSampler(names, sizes, tc.sampling, temperature, tc.max_steps, tc.seed)
    streams = {t: BatchStream(sizes[i], micro, tc.seed, i) for i, t in enumerate(names)}
    consumed = dict(state.get("consumed", {t: 0 for t in names}))
    start_step = int(state.get("step", 0))
    best = float(state.get("best_objective", -np.inf))
    best_step = int(state.get("best_step", -1))
    bad_evals = int(state.get("bad_evals", 0))
    examples = int(state.get("examples", 0))
    kinds = raw.model.kinds
    tracker = _Mlflow(config.get("mlflow_uri"), config.get("mlflow_run_id")) if rank == 0 else _Mlflow(None, None)

    def batch_for(task: str, k: int):
        rows = streams[task].batch_indices(k)[rank::world]
        arr = data[task]["train"]
        ids, mask, labels = (torch.as_tensor(arr[c][rows], device=device)
                             for c in ("input_ids", "attention_mask", "labels"))
        return trim(ids, mask, labels)

    def evaluate() -> dict[str, dict[str, float]]:
        module.eval()
        results = {}
        for t in names:
            arr = data[t]["validation"]
            n = len(arr["idx"])
            mine = {k: v[rank::world] for k, v in arr.items()}
            n_batches = math.ceil(math.ceil(n / world) / tc.eval_batch_size)  # same on every rank
            with autocast():
                preds, refs = evaluate_arrays(lambda i, m, t=t: module({t: (i, m, None)}, logits=True)[t],
                                              kinds[t], mine, tc.eval_batch_size, device, n_batches)
            gathered = _gather((preds, refs), world)
            if rank == 0:
                allp = [x for g in gathered for x in g[0]]
                allr = [x for g in gathered for x in g[1]]
                results[t] = kinds[t].metrics(allp, allr)
        module.train()
        return _broadcast(results, world)

    def save_and_report(step: int, metrics: dict[str, Any]) -> None:
        full = _full_state(module, strategy)
        opt = _optim_state(module, optimizer, strategy)
        ckpt_dir = None
        if rank == 0:
            ckpt_dir = tempfile.mkdtemp(prefix="mtl-ckpt-")
            model_state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            raw.model.save(Path(ckpt_dir) / MODEL_DIR, cached_tokenizer(config["tokenizer_dir"]), state_dict=model_state,
                           extra={"step": step, "validation": metrics.get("validation", {})})
            torch.save({
                "step": step, "optimizer": opt, "scheduler": scheduler.state_dict(), "consumed": consumed,
                "weighting": {k[len("weighting."):]: v for k, v in full.items() if k.startswith("weighting.")},
                "weighting_extra": raw.weighting.extra_state(), "best_objective": best, "best_step": best_step,
                "bad_evals": bad_evals, "examples": examples,
            }, Path(ckpt_dir) / TRAIN_STATE)
        report = {k: v for k, v in metrics.items() if k != "validation"}
        if ckpt_dir:
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        else:
            ray.train.report(report)

    module.train()
    window: dict[str, list[float]] = {t: [] for t in names}
    log_window: dict[str, list[float]] = {t: [] for t in names}  # since the last log point
    t0, ex0 = time.time(), examples
    log_t, log_ex = time.time(), examples

    def _log_progress(at: int, quiet: bool = False) -> set[str]:
        """A training-curve point every ``log_every`` steps (and at each evaluation): the mean loss
        per task since the previous point, averaged over workers, with lr and recent throughput.
        Returns the MLflow keys logged, so the evaluation at the same step does not log them again."""
        nonlocal log_t, log_ex
        seen = [t for t in names if log_window[t]]
        means = _all_mean([float(np.mean(log_window[t])) for t in seen], world, device)
        point = {"lr": scheduler.get_last_lr()[0], "train/samples_per_s": (examples - log_ex) / max(time.time() - log_t, 1e-9),
                 **{f"train/loss/{t}": v for t, v in zip(seen, means)}}
        if rank == 0:
            tracker.log(point, at)
            if not quiet:
                log.info(f"[train] step {at}/{tc.max_steps} loss " + " ".join(f"{t}:{v:.4f}" for t, v in zip(seen, means))
                      + f" | {point['train/samples_per_s']:.1f} samples/s, {time.time() - t0:.0f}s")
        for t in names:
            log_window[t] = []
        log_t, log_ex = time.time(), examples
        return set(point)
    train_s = 0.0  # seconds spent in training steps only (not evaluation or checkpoints)
    window_start = time.time()
    step = start_step
    stopped_early = False
    crash_at = int(config.get("_crash_at_step", -1))
    while step < tc.max_steps:
        tasks = sampler.tasks_for_step(step)
        optimizer.zero_grad(set_to_none=True)
        step_losses: dict[str, float] = {}
        for a in range(tc.grad_accum):
            batches = {}
            for t in tasks:
                batches[t] = batch_for(t, consumed[t])
                consumed[t] += 1
            last = a == tc.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()
            if tc.weighting == "pcgrad":
                losses = _pcgrad_step(raw, batches, weights, world, step, autocast)
            else:
                with sync:
                    with autocast():
                        total, losses = module(batches)
                    total = total / tc.grad_accum
                    (scaler.scale(total) if scaler else total).backward()
            for t, v in losses.items():
                step_losses[t] = step_losses.get(t, 0.0) + float(v) / tc.grad_accum
            examples += sum(len(b[0]) for b in batches.values()) * world
        if scaler:
            scaler.unscale_(optimizer)
        if tc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(module.parameters(), tc.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        step += 1
        for t, v in step_losses.items():
            window[t].append(v)
            log_window[t].append(v)
        at_eval = step % tc.eval_every == 0 or step == tc.max_steps
        logged: set[str] = set()
        if tc.log_every and (step % tc.log_every == 0 or at_eval):
            logged = _log_progress(step, quiet=at_eval)
        if step == crash_at and rank == world - 1 and not Path(config["_crash_flag"]).exists():
            Path(config["_crash_flag"]).write_text(str(step))
            # Fault injection for tests: this worker process dies once, mid-run. The pause lets Ray's
            # controller register the checkpoint reported a moment ago (a death within the same
            # poll as the report would restart from the checkpoint before).
            time.sleep(float(config.get("_crash_delay_s", 5.0)))
            os._exit(1)

        if at_eval:
            train_s += time.time() - window_start
            names_seen = [t for t in names if window[t]]
            means = _all_mean([float(np.mean(window[t])) for t in names_seen], world, device)
            train_loss = dict(zip(names_seen, means))
            raw.weighting.end_window(train_loss)
            val = evaluate()
            obj = objective(val, kinds, tc.objective)
            if obj > best:
                best, best_step, bad_evals = obj, step, 0
            else:
                bad_evals += 1
            elapsed = time.time() - t0
            throughput = (examples - ex0) / max(train_s, 1e-9)  # training samples per training second
            metrics = {
                "step": step, "objective": obj, "best_objective": best, "best_step": best_step,
                "lr": scheduler.get_last_lr()[0], "samples_per_s": throughput, "examples": examples,
                **flatten_metrics("val", val),
                **{f"train/loss/{t}": v for t, v in train_loss.items()},
                **{f"weight/{t}": v for t, v in raw.weighting.weights().items()},
                "validation": val,
            }
            if rank == 0:
                scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                # MLflow's train/loss curve has one point per log_every steps; history.jsonl keeps
                # the whole evaluation window's means (what DWA and the tests read)
                tracker.log({k: v for k, v in scalars.items() if k not in logged}, step)
                if config.get("history_file"):
                    with open(config["history_file"], "a") as fh:
                        fh.write(json.dumps(scalars) + "\n")
                log.info(f"[train] step {step}/{tc.max_steps} objective {obj:.4f} (best {best:.4f} @ {best_step}) "
                      + " ".join(f"{t}:{val[t][kinds[t].primary_metric]:.3f}" for t in names)
                      + f" | {throughput:.1f} samples/s, {elapsed:.0f}s")
            window = {t: [] for t in names}
            stopped_early = tc.patience is not None and bad_evals >= tc.patience
            metrics["stopped_early"] = float(stopped_early)
            save_and_report(step, metrics)
            window_start = log_t = time.time()  # throughput counts training steps only
            if stopped_early:
                break


def _pcgrad_step(raw: TrainModule, batches, weights, world: int, step: int, autocast) -> dict[str, torch.Tensor]:
    """One PCGrad backward: per-task gradients of all parameters (autograd.grad, so DDP's own
    all-reduce hooks do not fire), averaged across workers by hand, projected, summed into .grad."""
    params = [p for p in raw.parameters() if p.requires_grad]
    flats, losses = [], {}
    for t, (ids, mask, labels) in batches.items():
        with autocast():
            logits = raw.model(ids, mask, [t])[t]
        loss = raw.model.kinds[t].loss(logits, labels) * float(weights.get(t, 1.0))
        losses[t] = loss.detach()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        if world > 1:
            dist.all_reduce(flat)
            flat /= world
        flats.append(flat)
    combined = pcgrad_combine(flats, seed=step)
    offset = 0
    for p in params:
        n = p.numel()
        g = combined[offset:offset + n].view_as(p)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += n
    return losses


# ---------------------------------------------------------------------------- driver side


def resolve_use_gpu(cfg: RunConfig) -> bool:
    """``train.use_gpu: auto`` -> GPUs when the connected cluster has any."""
    if cfg.train.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.train.use_gpu)


def check_train_config(cfg: RunConfig) -> None:
    """The config gate's rules (``mtl.config``), again for a config changed in code."""
    from mtl.config import check_config

    check_config(cfg)


def make_loop_config(cfg: RunConfig, data: dict[str, TaskData], mlflow_run_id: str | None = None,
                     **extra: Any) -> dict[str, Any]:
    """Everything a worker needs, as plain values (no Ray objects)."""
    from dataclasses import asdict

    from mtl.packages import resolve_encoder
    from pipelines.data import task_infos
    from pipelines.tracking import absolute_tracking_uri

    encoder = str(resolve_encoder(cfg.model.encoder))
    return {
        "cfg": cfg.to_dict(),
        "tasks": [asdict(i) for i in task_infos(cfg, data)],
        "encoder_dir": encoder,
        "tokenizer_dir": encoder,
        "mlflow_uri": absolute_tracking_uri(cfg.mlflow.tracking_uri) if cfg.mlflow.enabled else None,
        "mlflow_run_id": mlflow_run_id,
        **extra,
    }


def train_datasets(cfg: RunConfig, data: dict[str, TaskData]) -> dict[str, Any]:
    from pipelines.data import build_datasets

    return {k: v for k, v in build_datasets(cfg, data).items() if k.rsplit(".", 1)[1] in EVAL_SPLITS}


def build_trainer(cfg: RunConfig, loop_config: dict[str, Any], datasets: dict[str, Any], run_name: str,
                  storage_path: str, callbacks: list | None = None):
    """A TorchTrainer for this config: gloo on CPU, nccl on GPU; restarts from the last checkpoint
    on worker failure (``train.max_failures``); keeps the best and the latest checkpoints."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_utils import runtime_env

    tc = cfg.train
    use_gpu = resolve_use_gpu(cfg)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="objective",
                                               checkpoint_score_order="max"),
            callbacks=callbacks or None,
            worker_runtime_env=runtime_env(),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def best_checkpoint(result) -> tuple[Any, dict[str, Any]]:
    """(checkpoint, metrics) with the highest objective among those Ray kept."""
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if "objective" in m]
    if not kept:
        if result.checkpoint is None:
            raise RuntimeError("the run reported no checkpoint")
        return result.checkpoint, result.metrics or {}
    return max(kept, key=lambda cm: cm[1]["objective"])


def _evaluate_remote(model_dir: str, rows: dict[str, list[dict]], batch_size: int, threads: int):
    import ray

    from mtl.evaluation import test_report
    from mtl.model import MultiTaskModel

    torch.set_num_threads(max(1, threads))
    # the GPU only when Ray assigned one (Ray no longer hides GPUs from num_gpus=0 tasks)
    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    model, tokenizer = MultiTaskModel.load(model_dir, device)
    return test_report(model, tokenizer, rows, batch_size)


def evaluate_test(cfg: RunConfig, model_dir: str | Path, data: dict[str, TaskData], split: str = "test"):
    """Each task's metrics, report and confusion matrix on ``split``, computed in a Ray task that gets
    a worker's resources (a GPU when training had one)."""
    import ray

    use_gpu = resolve_use_gpu(cfg)
    fn = ray.remote(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if use_gpu else 0)(_evaluate_remote)
    rows = {t: d.splits[split] for t, d in data.items()}
    return ray.get(fn.remote(str(model_dir), rows, cfg.train.eval_batch_size, int(cfg.train.cpus_per_worker)))


def _run_dir(cfg: RunConfig, resume: bool) -> Path:
    root = Path(cfg.output_dir).resolve() / cfg.name
    if resume:
        runs = sorted(p for p in root.glob("train-*") if p.is_dir())
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier run under {root}")
        return runs[-1]
    return root / time.strftime("train-%Y%m%d-%H%M%S")


def run_training(cfg: RunConfig, resume: bool = False, data: dict[str, TaskData] | None = None,
                 register_model: bool = False, loop_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Data -> fit -> best checkpoint -> test sets -> MLflow (params, curves, reports, PNGs, model).
    Outputs under ``output_dir/name/train-<time>/``; ``resume`` continues the latest such run from its
    last checkpoint (Ray Train restores a run of the same name and storage path)."""
    from pipelines import tracking
    from pipelines.data import read_tasks
    from pipelines.ray_utils import init_ray

    check_train_config(cfg)
    data = data or read_tasks(cfg)  # fails before Ray on bad data
    init_ray()
    run_dir = _run_dir(cfg, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_id = None
    if cfg.mlflow.enabled:
        id_file = run_dir / "mlflow_run_id"
        if resume and id_file.exists():
            run_id = id_file.read_text().strip()
            tracking.setup(cfg)
        else:
            run_id = tracking.start_run(cfg, f"{cfg.name}/{run_dir.name}", tags={"mtl_ray.stage": "train"})
            id_file.write_text(run_id)
    print(f"[train] {cfg.name}: {len(cfg.tasks)} tasks, {cfg.train.num_workers} worker(s), "
          f"{cfg.train.strategy}, outputs in {run_dir}", flush=True)
    loop_config = make_loop_config(cfg, data, run_id, history_file=str(run_dir / "history.jsonl"), **(loop_extra or {}))
    trainer = build_trainer(cfg, loop_config, train_datasets(cfg, data),
                            run_name="ray", storage_path=str(run_dir))
    try:
        result = trainer.fit()
    except Exception:
        if run_id:
            tracking.end_run(run_id, "FAILED")
        raise
    fit_s = time.time() - t0
    ckpt, best_metrics = best_checkpoint(result)
    model_dir = run_dir / MODEL_DIR
    shutil.rmtree(model_dir, ignore_errors=True)
    with ckpt.as_directory() as d:
        shutil.copytree(Path(d) / MODEL_DIR, model_dir)
    test = evaluate_test(cfg, model_dir, data)
    last = result.metrics or {}
    summary = {
        "run_dir": str(run_dir), "mlflow_run_id": run_id, "model_dir": str(model_dir),
        "best_step": best_metrics.get("step"), "best_objective": best_metrics.get("objective"),
        "steps": last.get("step"), "stopped_early": bool(last.get("stopped_early", 0)),
        "samples_per_s": last.get("samples_per_s"), "wall_s": round(time.time() - t0, 1),
        "fit_s": round(fit_s, 1),
        "test_metrics": {t: r["metrics"] for t, r in test.items()},
    }
    sizes = {t: {s: len(d.splits[s]) for s in d.splits} for t, d in data.items()}
    if run_id:
        tracking.log_test_results(run_id, test)
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.log_text(run_id, tracking.model_card(cfg, test, sizes, {
            "best step": summary["best_step"], "training wall time (s)": summary["fit_s"],
            "samples/s": f"{summary['samples_per_s']:.1f}" if summary["samples_per_s"] else "n/a"}), "model_card.md")
        summary["model_uri"] = tracking.log_model(run_id, model_dir)
        if register_model:
            summary["registered_version"] = tracking.register(summary["model_uri"], cfg.mlflow.registered_model, test)
        for k in ("wall_s", "fit_s"):
            client.log_metric(run_id, k, summary[k])
        tracking.log_summary(run_id, summary)
        tracking.end_run(run_id)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[train] done in {summary['wall_s']}s; best objective {summary['best_objective']:.4f} at step "
          f"{summary['best_step']}; test: " + ", ".join(
              f"{t} {cfg_metric(m)}" for t, m in summary["test_metrics"].items()), flush=True)
    return summary


def cfg_metric(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
