"""Tokenization throughput: Ray Data (the project's data step) vs Hugging Face ``datasets.map``.

    python -m benchmarks.data_tokenize --quick     # the quick config's slices (about 3,000 rows)
    python -m benchmarks.data_tokenize             # all of ATIS (intent + slots), Rotten Tomatoes, BBC

Same texts (every split of every task of the config), same fast tokenizer (MiniLM's), same function:
``pipelines.data.Tokenize`` (which calls ``mtl.encoding.encode_batch``), same rows per batch
(``data.tokenize_batch_size``).

- Ray Data: ``pipelines.data.build_datasets`` then ``materialize()`` of every dataset, rows/s with
  and without ``ray.init`` (start-up).
- datasets: ``Dataset.from_dict(...).map(Tokenize, batched=True)`` per task and split, in memory,
  with ``num_proc=1`` and with ``num_proc=os.cpu_count()``.

Both sides' outputs are compared on one dataset (they must be identical). No target: the figures
say what Ray Data's parallelism buys or costs at this size on this machine.
"""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks.common import (
    FULL_CONFIG,
    QUICK_CONFIG,
    load_cfg,
    parser,
    phase,
    write_result,
)

NAME = "data_tokenize"


def hf_tokenize(cfg, data, tok_dir: str, num_proc: int | None) -> tuple[float, dict]:
    import datasets

    from pipelines.data import Tokenize, task_infos

    datasets.disable_caching()
    datasets.disable_progress_bars()
    out = {}
    t0 = time.perf_counter()
    for info in task_infos(cfg, data):
        fn = Tokenize(tok_dir, info)
        for split, rows in data[info.name].splits.items():
            ds = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows],
                                             "idx": [r["idx"] for r in rows]})
            n_proc = num_proc if num_proc and num_proc > 1 and len(rows) >= 2 * num_proc else None
            out[f"{info.name}.{split}"] = ds.map(fn, batched=True, batch_size=cfg.data.tokenize_batch_size,
                                                 remove_columns=["text", "label"], keep_in_memory=True,
                                                 num_proc=n_proc)
    return time.perf_counter() - t0, out


def ray_tokenize(cfg, data, tok_dir: str) -> tuple[float, float, dict]:
    from pipelines.data import build_datasets
    from pipelines.ray_utils import init_ray

    t0 = time.perf_counter()
    init_ray(log_to_driver=False)
    t1 = time.perf_counter()
    materialized = {k: ds.materialize() for k, ds in build_datasets(cfg, data, tok_dir).items()}
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, materialized


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    args = p.parse_args(argv)
    from mtl.packages import resolve_encoder
    from pipelines.data import cached_tokenizer, read_tasks

    cfg = load_cfg(QUICK_CONFIG if args.quick else FULL_CONFIG)
    data = read_tasks(cfg)
    rows = sum(len(r) for td in data.values() for r in td.splits.values())
    chars = sum(len(x["text"]) for td in data.values() for r in td.splits.values() for x in r)
    tok_dir = str(resolve_encoder(cfg.model.encoder))
    cached_tokenizer(tok_dir)  # loaded once here, outside the timings (Ray workers load their own)
    print(f"{rows:,} rows ({chars / rows:.0f} characters on average) from {len(data)} tasks", flush=True)

    with phase("datasets.map, num_proc=1"):
        hf1_s, hf_out = hf_tokenize(cfg, data, tok_dir, None)
    hf_n = None
    n_cpu = os.cpu_count() or 1
    if n_cpu > 1:
        with phase(f"datasets.map, num_proc={n_cpu}"):
            hf_n, _ = hf_tokenize(cfg, data, tok_dir, n_cpu)
    with phase("Ray Data: ray.init + build_datasets + materialize"):
        init_s, ray_s, ray_out = ray_tokenize(cfg, data, tok_dir)
    ray_rows = sum(ds.count() for ds in ray_out.values())

    key = next(iter(ray_out))
    r = ray_out[key].to_pandas().sort_values("idx")
    h = hf_out[key].to_pandas().sort_values("idx")
    identical = bool(np.array_equal(np.stack(r["input_ids"].to_numpy()), np.stack(h["input_ids"].to_numpy()))
                     and np.array_equal(np.stack(r["attention_mask"].to_numpy()),
                                        np.stack(h["attention_mask"].to_numpy())))
    import ray

    ray.shutdown()

    figures = {
        "rows": rows,
        "ray_rows": ray_rows,
        "mean_chars_per_row": round(chars / rows, 1),
        "datasets_map_rows_per_s": round(rows / hf1_s, 1),
        "datasets_map_s": round(hf1_s, 2),
        f"datasets_map_num_proc{n_cpu}_rows_per_s": round(rows / hf_n, 1) if hf_n else None,
        f"datasets_map_num_proc{n_cpu}_s": round(hf_n, 2) if hf_n else None,
        "ray_data_rows_per_s_without_startup": round(rows / ray_s, 1),
        "ray_data_rows_per_s_with_startup": round(rows / (ray_s + init_s), 1),
        "ray_data_s": round(ray_s, 2),
        "ray_init_s": round(init_s, 2),
        "ray_over_datasets_without_startup": round(hf1_s / ray_s, 3),
        "ray_over_datasets_with_startup": round(hf1_s / (ray_s + init_s), 3),
        "datasets": len(ray_out),
        "outputs_identical_on": key if identical else None,
    }
    print(f"datasets.map {figures['datasets_map_rows_per_s']:,.0f} rows/s; Ray Data "
          f"{figures['ray_data_rows_per_s_without_startup']:,.0f} rows/s without start-up, "
          f"{figures['ray_data_rows_per_s_with_startup']:,.0f} with (ray.init {init_s:.1f}s); "
          f"outputs identical: {identical}", flush=True)
    return write_result(NAME, "Tokenization: Ray Data vs datasets.map (rows/s)", args, figures, [], notes=[
        "Same texts, tokenizer, function (pipelines.data.Tokenize -> mtl.encoding.encode_batch) and batch size.",
        "Ray Data: build_datasets (from_items + map_batches + select_columns) then materialize() of each "
        f"of the {len(ray_out)} task/split datasets in turn; the timing includes from_items and the "
        "workers' tokenizer loading.",
        "datasets: from_dict + map(batched=True, keep_in_memory=True), caching off; the driver's tokenizer "
        "was loaded before timing.",
        "No target: informational.",
    ])


if __name__ == "__main__":
    main()
