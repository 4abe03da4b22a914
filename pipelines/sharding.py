"""How Ray Train workers get their data: the training datasets (``train_datasets``), how they are
split over the workers (``data_config``, ``ShardData``) and what each worker hands the engine
(``worker_data``: its streamed shard of each training split, its shard of each validation split).
Training splits are per input (``RunConfig.inputs``): a shared input's ``input.<name>.train``, or
a task's own ``<task>.train``; validation splits are per task.
Imported by the training glue when it builds a trainer and inside each worker."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.train import DataConfig

from mtl.config import RunConfig
from mtl.engine import Shard, StreamBatches
from mtl.readers import TaskData
from mtl.sampling import length_grouped

EVAL_SPLITS = ("train", "validation")  # what workers load; the test pass runs after fit


def train_datasets(cfg: RunConfig, data: dict[str, TaskData], tokenizer_dir: str | None = None) -> dict[str, Any]:
    """What the workers read: each input's training split and each task's validation split."""
    from pipelines.data import build_datasets, dataset_key, train_key

    wanted = {train_key(cfg, i) for i in cfg.inputs} | {dataset_key(t, "validation") for t in cfg.task_names}
    out = {k: v for k, v in build_datasets(cfg, data, tokenizer_dir).items() if k in wanted}
    if cfg.train.data_sharding == "streaming":  # a fresh block order each epoch; rows mix in the workers' buffers
        out = {k: v.randomize_block_order(seed=cfg.seed) if k.endswith(".train") else v for k, v in out.items()}
    return out


def data_config(cfg: RunConfig, names: list[str]):
    """Streaming: the training splits (one per input) split into equal shards (ranks take the same
    number of batches per epoch, so they stay in step) and the validation splits into shards that
    drop no row; replicated: nothing split."""
    from pipelines.data import train_key

    if cfg.train.data_sharding == "replicated":
        return DataConfig(datasets_to_split=[])
    inputs = [i for i, ts in cfg.inputs.items() if any(t in names for t in ts)]
    return ShardData([train_key(cfg, i) for i in inputs], [f"{t}.validation" for t in names])


def worker_data(loop) -> dict[str, dict[str, Any]]:
    """This worker's input for the engine: its streamed shard of each training split and (read at
    the first evaluation) its shard of each validation split; or, replicated, whole splits."""
    import ray.train

    from pipelines.data import train_key

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc, ec = loop.cfg.train, loop.engine_config()
    names = [task.name for task in loop.tasks]
    inputs = [i for i, ts in loop.cfg.inputs.items() if any(t in names for t in ts)]
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(inputs):  # a shared input's training split under its name, a task's under its own
        train = ray.train.get_dataset_shard(train_key(loop.cfg, name))
        if tc.data_sharding == "replicated":
            out[name] = {"train": _materialize(train)}
            continue
        per_rank = ec.batch_size // ec.grad_accum // world
        rows = loop.train_sizes[name] // world  # an equal streaming split: every shard this many rows
        epochs = _epochs(train, per_rank, min(tc.shuffle_buffer, rows), ec.seed, i, rank, tc.group_by_length)
        out[name] = {"train": StreamBatches(epochs,
                                            loop.train_sizes[name], max(1, math.ceil(rows / per_rank)),
                                            prefetch=tc.prefetch_batches)}
    for t in names:
        val = ray.train.get_dataset_shard(f"{t}.validation")
        part = _materialize(val) if tc.data_sharding == "replicated" else Shard(lambda val=val: _materialize(val))
        out.setdefault(t, {})["validation"] = part
    return out


def _epochs(shard, batch: int, buffer: int, seed: int, task: int, rank: int, group_by_length: bool = False):
    """Epoch ``e`` of this worker's training shard: batches of ``batch`` rows (the last one may be
    smaller), locally shuffled with a seed of (seed, task, rank, epoch); with ``group_by_length``,
    regrouped into batches of similar length (``mtl.sampling.length_grouped``: the same rows and
    number of batches, so ranks stay in step)."""
    def epoch(e: int):
        shuffle_seed = int(np.random.SeedSequence([seed, task, rank, e]).generate_state(1)[0])
        batches = shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=False,
                                     local_shuffle_buffer_size=max(buffer, batch), local_shuffle_seed=shuffle_seed)
        return length_grouped(batches, batch, shuffle_seed) if group_by_length else batches
    return epoch


def _materialize(iterator) -> dict[str, np.ndarray]:
    """All rows of a Ray Data iterator as numpy arrays, in ``idx`` order (deterministic)."""
    parts = list(iterator.iter_batches(batch_size=2048, batch_format="numpy"))
    if not parts:  # an empty shard (a split smaller than the worker count)
        return {"idx": np.zeros(0, np.int64), "input_ids": np.zeros((0, 1), np.int64),
                "attention_mask": np.zeros((0, 1), np.int64), "labels": np.zeros(0, np.int64)}
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(out["idx"], kind="stable")
    return {k: v[order] for k, v in out.items()}


class ShardData(DataConfig):
    """Streaming-splits ``equal`` datasets into shards of equal row counts (training splits: every
    rank takes the same number of batches per epoch, so ranks stay in step) and ``unequal`` ones
    into shards that drop no row (evaluation splits). Ray Train's own ``DataConfig`` splits every
    dataset it splits with ``equal=True``, which would drop up to ``world - 1`` evaluation rows."""

    def __init__(self, equal: list[str], unequal: list[str]):
        # both lists are "split" for Ray Train (Train V2 then calls configure once per dataset,
        # with every worker waiting for its shard); configure decides how
        super().__init__(datasets_to_split=list(equal) + list(unequal))
        self.unequal = set(unequal)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k not in self.unequal}
        out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name in self.unequal.intersection(datasets):
            ds = datasets[name]
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                out[i][name] = split
        return out
