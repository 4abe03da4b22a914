"""Data step: config -> per-task tokenized, label-aligned Ray Datasets.

    mtl-ray data --config configs/quick.yaml

File sources (csv, jsonl, parquet, conll) are read where they lie by Ray Data
(``pipelines.sources``): the driver resolves their files and checks their columns before Ray starts,
so a wrong path or column fails at once, and never holds their rows. The embedded datasets are
small and read in plain Python (``mtl.readers``). Ray Data then tokenizes and aligns labels in
``map_batches`` with the fast tokenizer; every dataset has the numeric columns ``idx``,
``input_ids``, ``attention_mask`` and ``labels`` that ``ray.train.get_dataset_shard`` hands to the
trainer.

Tasks that share an ``input`` (``TaskSpec.input``) are read once (``mtl.readers.read_input``, or
one Ray Data read for file sources) and their rows are also tokenized once, as the datasets
``input.<name>.<split>`` with one ``labels.<task>`` column per task: what training draws from.
Their per-task datasets ``<task>.<split>`` hold the same rows and serve evaluation.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mtl.config import RunConfig
from mtl.encoding import encode_batch, encode_input_batch, labels_column
from mtl.model import TaskInfo
from mtl.packages import package_root, required_packages, resolve_encoder
from mtl.readers import SPLITS, TaskData, input_rows, label_column, read_input, read_task
from mtl.tasks import make_kind
from pipelines.sources import (
    RayTaskData,
    is_ray_source,
    open_input,
    open_source,
    plan_input,
    plan_source,
)

COLUMNS = ["idx", "input_ids", "attention_mask", "labels"]


def dataset_key(task: str, split: str) -> str:
    """Name of a task's split among the trainer's datasets."""
    return f"{task}.{split}"


def input_key(name: str, split: str) -> str:
    """Name of a shared input's split among the trainer's datasets."""
    return f"input.{name}.{split}"


def train_key(cfg: RunConfig, name: str) -> str:
    """The training dataset of input ``name`` (``RunConfig.inputs``): a shared input's, or the task's."""
    return dataset_key(name, "train") if cfg.inputs[name] == [name] else input_key(name, "train")


def shared_inputs(cfg: RunConfig) -> dict[str, list[str]]:
    """The inputs two tasks or more share (name -> tasks)."""
    return {name: tasks for name, tasks in cfg.inputs.items() if tasks != [name]}


def check_environment(cfg: RunConfig) -> None:
    """Every data/model package the config needs is installed (raises with the pip command)."""
    for module in required_packages([t.source.type for t in cfg.tasks], cfg.model.encoder):
        package_root(module)
    resolve_encoder(cfg.model.encoder)


def read_tasks(cfg: RunConfig) -> dict[str, TaskData]:
    """Every task's labels and splits. Packages, files and columns are checked first, without Ray;
    then, when a task has a file source, Ray starts (``init_ray``: joins ``RAY_ADDRESS`` or starts a
    local one) and that task becomes a ``RayTaskData`` of Ray Datasets (one counting pass each)."""
    check_environment(cfg)
    out: dict[str, TaskData] = {}
    plans = {}
    grouped = set()
    for name, tasks in shared_inputs(cfg).items():
        specs = [cfg.task(t) for t in tasks]
        where = f"tasks.{cfg.task_names.index(tasks[0])}.source"
        grouped.update(tasks)
        if is_ray_source(specs[0]):  # one Ray Data read with a label column per task
            plans[name] = plan_input(specs, name, where)
        else:  # embedded ATIS: the lines read once, labelled for each task
            out.update(read_input(specs, cfg.data, cfg.seed, name, where=where))
    for i, t in enumerate(cfg.tasks):
        if t.name in grouped:
            continue
        if is_ray_source(t):
            plans[t.name] = plan_source(t, where=f"tasks.{i}.source")
        else:
            out[t.name] = read_task(t, cfg.data, cfg.seed, where=f"tasks.{i}.source")
    if plans:
        from pipelines.ray_utils import init_ray, required_cpus

        init_ray(min_cpus=required_cpus(cfg))  # a local Ray sized for the run that reads this data
        # one counting pass per task; Ray Data runs them side by side from threads
        with ThreadPoolExecutor(max_workers=min(4, len(plans))) as pool:
            opened = pool.map(lambda plan: (open_input if plan.input else open_source)(plan, cfg.data, cfg.seed),
                              plans.values())
            for key, got in zip(plans, opened):
                out.update(got if isinstance(got, dict) else {key: got})
    return {t.name: out[t.name] for t in cfg.tasks}


def task_infos(cfg: RunConfig, data: dict[str, TaskData]) -> list[TaskInfo]:
    return [
        TaskInfo(t.name, t.kind, data[t.name].labels, cfg.max_length(t), t.pooling, t.head_dropout,
                 adapter=t.adapter.model_dump() if t.adapter else None)
        for t in cfg.tasks
    ]


_TOKENIZERS: dict[str, Any] = {}


def cached_tokenizer(path: str):
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


class TokenizeInput:
    """``map_batches`` function for a shared input: raw rows (``text``, ``label.<task>``) -> idx,
    input_ids, attention_mask and ``labels.<task>`` per task, from one tokenization."""

    def __init__(self, tokenizer_dir: str, infos: list[TaskInfo]):
        self.tokenizer_dir = tokenizer_dir
        self.infos = infos

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = {i.name: make_kind(i.kind, i.labels) for i in self.infos}
        labels = {t: [list(x) if isinstance(x, (list, np.ndarray)) else x for x in batch[label_column(t)]]
                  for t in kinds}
        enc = encode_input_batch(cached_tokenizer(self.tokenizer_dir), kinds, [str(t) for t in batch["text"]],
                                 labels, self.infos[0].max_length)
        enc["idx"] = np.asarray(batch["idx"], dtype=np.int64)
        return enc


class Tokenize:
    """``map_batches`` function: raw rows -> idx, input_ids, attention_mask, labels."""

    def __init__(self, tokenizer_dir: str, info: TaskInfo):
        self.tokenizer_dir = tokenizer_dir
        self.info = info

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kind = make_kind(self.info.kind, self.info.labels)
        labels = [list(x) if isinstance(x, (list, np.ndarray)) else x for x in batch["label"]]
        enc = encode_batch(cached_tokenizer(self.tokenizer_dir), kind, [str(t) for t in batch["text"]],
                           labels, self.info.max_length)
        enc["idx"] = np.asarray(batch["idx"], dtype=np.int64)
        return enc


def build_datasets(cfg: RunConfig, data: dict[str, TaskData], tokenizer_dir: str | None = None) -> dict[str, Any]:
    """Ray Datasets keyed ``<task>.<split>``, and ``input.<name>.<split>`` for each shared input:
    rows are tokenized lazily, in parallel, by Ray Data."""
    import ray.data

    tokenizer_dir = tokenizer_dir or str(resolve_encoder(cfg.model.encoder))
    out = {}
    infos = {i.name: i for i in task_infos(cfg, data)}
    for name, tasks in shared_inputs(cfg).items():
        columns = ["idx", "input_ids", "attention_mask", *(labels_column(t) for t in tasks)]
        for split in SPLITS:
            ds = _input_dataset({t: data[t] for t in tasks}, split)
            out[input_key(name, split)] = ds.map_batches(
                TokenizeInput(tokenizer_dir, [infos[t] for t in tasks]), batch_size=cfg.data.tokenize_batch_size,
                batch_format="numpy").select_columns(columns)
    for info in infos.values():
        td = data[info.name]
        for split in SPLITS:
            if isinstance(td, RayTaskData):
                ds = td.dataset(split)
            else:
                rows = td.splits[split]
                ds = ray.data.from_items(rows, override_num_blocks=max(1, min(8, len(rows) // 512)))
            out[dataset_key(info.name, split)] = ds.map_batches(
                Tokenize(tokenizer_dir, info), batch_size=cfg.data.tokenize_batch_size, batch_format="numpy"
            ).select_columns(COLUMNS)
    return out


def _input_dataset(tasks: dict[str, TaskData], split: str):
    """A shared input's raw rows (``idx``, ``text``, ``label.<task>``) as a Ray Dataset."""
    import ray.data

    first = next(iter(tasks.values()))
    if isinstance(first, RayTaskData):
        return first.input_dataset(split)
    rows = input_rows(tasks, split)
    return ray.data.from_items(rows, override_num_blocks=max(1, min(8, len(rows) // 512)))


def summarize(cfg: RunConfig, data: dict[str, TaskData]) -> str:
    """Split sizes and label counts per task, as ``mtl-ray data`` prints them."""
    lines = []
    for t in cfg.tasks:
        td = data[t.name]
        sizes = {s: td.size(s) for s in SPLITS}
        if "duplicates_dropped" in td.stats:
            read = f"; read {td.stats['read']:,}, {td.stats['duplicates_dropped']} exact duplicate texts dropped"
        elif "read" in td.stats:
            read = f"; read {td.stats['read']:,} where they lie, split by a hash of the text"
        else:
            read = ""
        lines.append(
            f"{t.name} ({t.kind}, source {t.source.type}): "
            + ", ".join(f"{s} {n:,}" for s, n in sizes.items())
            + f"; {sum(sizes.values()):,} in all" + read
        )
        lines.append(f"  labels: {len(td.labels)}" + (" (BIO tags; counts are entities)" if t.kind == "token_classification" else ""))
        for split in SPLITS:
            counts = td.label_counts(split)
            if counts:
                shown = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:12])
                more = f", ... ({len(counts) - 12} more)" if len(counts) > 12 else ""
                lines.append(f"  {split:<10} {shown}{more}")
        for split in SPLITS:
            unseen = td.unseen(split)
            if unseen:
                lines.append(f"  {split:<10} not in the labels (skipped when encoding): "
                             + ", ".join(f"{k} {v}" for k, v in unseen.items()))
    return "\n".join(lines)


def run_data(cfg: RunConfig, tokenize: bool = True) -> dict[str, Any]:
    """Read, report and (optionally) tokenize every task through Ray Data; returns counts."""
    t0 = time.time()
    data = read_tasks(cfg)
    print(summarize(cfg, data), flush=True)
    result: dict[str, Any] = {t: {s: d.size(s) for s in SPLITS} for t, d in data.items()}
    if tokenize:
        from pipelines.ray_utils import init_ray

        init_ray()
        datasets = build_datasets(cfg, data)
        for key, ds in datasets.items():
            n = ds.count()
            name, split = key.rsplit(".", 1)  # a task, or input.<name> for a shared input's rows
            result.setdefault(name, {})[split + "_tokenized"] = n
        print(f"[data] tokenized {sum(d.size(s) for d in data.values() for s in SPLITS):,} rows "
              f"through Ray Data in {time.time() - t0:.1f}s", flush=True)
    return result
