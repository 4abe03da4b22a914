"""How Ray Train workers get their data: the training datasets (``train_datasets``), how they are
split over the workers (``data_config``, ``ShardData``) and what each worker hands the engine
(``worker_data``: its streamed shard of each training split, its shard of each validation split).
Imported by the training glue when it builds a trainer and inside each worker."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.train import DataConfig

from mtl.config import RunConfig
from mtl.engine import Shard, StreamBatches
from mtl.readers import TaskData

EVAL_SPLITS = ("train", "validation")  # what workers load; the test pass runs after fit


def train_datasets(cfg: RunConfig, data: dict[str, TaskData], tokenizer_dir: str | None = None) -> dict[str, Any]:
    from pipelines.data import build_datasets

    out = {k: v for k, v in build_datasets(cfg, data, tokenizer_dir).items() if k.rsplit(".", 1)[1] in EVAL_SPLITS}
    if cfg.train.data_sharding == "streaming":  # a fresh block order each epoch; rows mix in the workers' buffers
        out = {k: v.randomize_block_order(seed=cfg.seed) if k.endswith(".train") else v for k, v in out.items()}
    return out


def data_config(cfg: RunConfig, names: list[str]):
    """Streaming: the training splits split into equal shards (ranks take the same number of
    batches per epoch, so they stay in step) and the validation splits into shards that drop no
    row; replicated: nothing split."""
    if cfg.train.data_sharding == "replicated":
        return DataConfig(datasets_to_split=[])
    return ShardData([f"{t}.train" for t in names], [f"{t}.validation" for t in names])


def worker_data(loop) -> dict[str, dict[str, Any]]:
    """This worker's input for the engine: its streamed shard of each training split and (read at
    the first evaluation) its shard of each validation split; or, replicated, whole splits."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc, ec = loop.cfg.train, loop.engine_config()
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(task.name for task in loop.tasks):
        train, val = (ray.train.get_dataset_shard(f"{t}.{s}") for s in EVAL_SPLITS)
        if tc.data_sharding == "replicated":
            out[t] = {"train": _materialize(train), "validation": _materialize(val)}
            continue
        per_rank = ec.batch_size // ec.grad_accum // world
        rows = loop.train_sizes[t] // world  # an equal streaming split: every shard this many rows
        out[t] = {"train": StreamBatches(_epochs(train, per_rank, min(tc.shuffle_buffer, rows), ec.seed, i, rank),
                                         loop.train_sizes[t], max(1, math.ceil(rows / per_rank))),
                  "validation": Shard(lambda val=val: _materialize(val))}
    return out


def _epochs(shard, batch: int, buffer: int, seed: int, task: int, rank: int):
    """Epoch ``e`` of this worker's training shard: batches of ``batch`` rows (the last one may be
    smaller), locally shuffled with a seed of (seed, task, rank, epoch)."""
    def epoch(e: int):
        return shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=False,
                                  local_shuffle_buffer_size=max(buffer, batch),
                                  local_shuffle_seed=int(np.random.SeedSequence([seed, task, rank, e]).generate_state(1)[0]))
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
