"""One 4-task model vs four single-task models: test metrics, training time, serving throughput.

    python -m benchmarks.mtl_vs_single --quick     # quick-config slices, 200 train rows per task, 8 steps
    python -m benchmarks.mtl_vs_single             # full data (configs/atis_sentiment_news.yaml)

Every model is trained by ``pipelines.train.run_training`` (Ray Train, 1 worker, MLflow off, outputs
in a temp dir unless ``--keep DIR``) on the same read and split data.

How the budget is matched: the multi-task run samples tasks round_robin for S steps, so each task
gets exactly S/4 batches of ``batch_size`` rows; each single-task run trains S/4 steps at the same
batch size on the same training rows (BatchStream is seeded by the task's position, so a single-task
run draws them in another random order, except for the first task). Same learning rates, warm-up
ratio and linear decay (over each run's own steps), validation at the same per-task progress
(eval_every/4), early stopping off; each run keeps its best checkpoint
by its validation objective (the multi-task one by the mean over tasks).

Serving: in-process ``Predictor`` (cuda when there is one) on batches of 32 real test texts; a
request wants all four tasks: one ``predict`` of the 4-task model (one encoder pass) vs one
``predict`` on each single-task model (four passes). Targets: multi-task metric ≥ single-task − 0.5
points on every task; ≥ 3× requests/s.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    FULL_CONFIG,
    QUICK_CONFIG,
    Timer,
    load_cfg,
    parser,
    phase,
    primary_metric,
    target,
    threads,
    write_result,
)

NAME = "mtl_vs_single"


def single_config(cfg, task: str, steps: int, eval_every: int, output_dir: str):
    """``cfg`` with only ``task``, ``steps`` steps, validation every ``eval_every``."""
    from mtl.config import config_from_dict

    raw = cfg.to_dict()
    raw["tasks"] = [{**t, "input": None} for t in raw["tasks"] if t["name"] == task]  # alone: no shared input
    raw["name"] = f"single-{task}"
    raw["output_dir"] = output_dir
    raw["train"].update(max_steps=steps, eval_every=eval_every)
    return config_from_dict(raw)


def run_history_loop_s(run_dir: str) -> float | None:
    import json

    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        return None
    last = json.loads(path.read_text().splitlines()[-1])
    return last["examples"] / last["samples_per_s"] if last.get("samples_per_s") else None


def serving(mtl_dir: str, single_dirs: dict[str, str], texts: list[str], batch: int, passes: int,
            short_texts: list[str] | None = None) -> dict:
    from mtl.predictor import Predictor

    multi = Predictor.load(mtl_dir)
    singles = {t: Predictor.load(d) for t, d in single_dirs.items()}
    tasks = list(single_dirs)

    def run_multi(chunk):
        return multi.predict(chunk, tasks)

    def run_singles(chunk):
        return [singles[t].predict(chunk, [t]) for t in tasks]

    def rate(fn, chunk_texts: list[str]) -> dict:
        """Requests/s of ``fn`` over ``chunk_texts`` in batches, best of ``passes`` (after a warm-up batch)."""
        fn(chunk_texts[:batch])
        best = float("inf")
        for _ in range(passes):
            with Timer() as t:
                for i in range(0, len(chunk_texts), batch):
                    fn(chunk_texts[i:i + batch])
            best = min(best, t.s)
        return {"requests_per_s": round(len(chunk_texts) / best, 2), "best_pass_s": round(best, 3)}

    out = {"device": str(multi.device)}
    for prefix, chunk_texts in (("", texts), ("short_", short_texts or [])):
        for name, fn in (("multi_task", run_multi), ("single_task_x4", run_singles)):
            if chunk_texts:
                out[prefix + name] = rate(fn, chunk_texts)
    if short_texts:
        out["short_speedup"] = round(out["short_multi_task"]["requests_per_s"]
                                     / out["short_single_task_x4"]["requests_per_s"], 3)
    out["speedup"] = round(out["multi_task"]["requests_per_s"] / out["single_task_x4"]["requests_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--config", default=None, help="default: quick.yaml with --quick, else atis_sentiment_news.yaml")
    p.add_argument("--steps", type=int, default=None,
                   help="multi-task steps S (each single-task model gets S/4); quick 8, full: the config's")
    p.add_argument("--max-examples", type=int, default=None, help="train rows per task (quick 200)")
    p.add_argument("--texts", type=int, default=None, help="texts per serving pass (quick 64, full 1024)")
    p.add_argument("--keep", default=None, help="keep the runs under this folder (default: a temp dir)")
    args = p.parse_args(argv)
    import torch

    from pipelines.data import read_tasks
    from pipelines.ray_utils import init_ray
    from pipelines.train import run_training

    torch.set_num_threads(threads(args))
    cfg = load_cfg(args.config or (QUICK_CONFIG if args.quick else FULL_CONFIG))
    k = len(cfg.tasks)
    steps = args.steps or (8 if args.quick else cfg.train.max_steps)
    steps -= steps % k
    if steps < k:
        raise SystemExit(f"--steps must be at least the number of tasks ({k})")
    max_examples = args.max_examples or (200 if args.quick else None)
    evals = 1 if args.quick else max(1, steps // cfg.train.eval_every)
    eval_every = max(k, steps // evals // k * k)
    raw = cfg.to_dict()
    for t in raw["tasks"]:
        if max_examples:
            t["max_examples"] = max_examples
    raw["train"].update(sampling="round_robin", max_steps=steps, eval_every=eval_every, patience=None,
                        num_workers=1, max_failures=0)
    from mtl.config import config_from_dict

    out_root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-mtl-"))
    raw["output_dir"] = str(out_root)
    raw["name"] = "multi"
    cfg = config_from_dict(raw)
    data = read_tasks(cfg)
    init_ray(log_to_driver=False)
    print(f"{k} tasks; multi-task {steps} steps (round_robin, {steps // k} batches of {cfg.train.batch_size} "
          f"per task); single-task {steps // k} steps each; outputs in {out_root}", flush=True)

    runs = {}
    t0 = time.time()
    with phase(f"multi-task run, {steps} steps"):
        runs["multi"] = run_training(cfg, data=data)
    multi_wall = time.time() - t0
    single_wall = 0.0
    for t in cfg.task_names:
        scfg = single_config(cfg, t, steps // k, max(1, eval_every // k), str(out_root))
        t0 = time.time()
        with phase(f"single-task run {t}, {steps // k} steps"):
            runs[t] = run_training(scfg, data={t: data[t]})
        single_wall += time.time() - t0

    per_task, targets = {}, []
    for t in cfg.task_names:
        spec = cfg.task(t)
        m = primary_metric(spec.kind, data[t].labels)
        a = runs["multi"].test_metrics[t][m]
        b = runs[t].test_metrics[t][m]
        per_task[t] = {"metric": m, "multi_task": round(100 * a, 2), "single_task": round(100 * b, 2),
                       "diff_pts": round(100 * (a - b), 2)}
        targets.append(target(f"{t}_{m}_multi_minus_single", 100 * (a - b), -0.5, ">=", " pts"))
        print(f"  {t} {m}: multi {100 * a:.2f}, single {100 * b:.2f} ({100 * (a - b):+.2f} pts)", flush=True)

    from benchmarks.quantization import interleaved_texts

    n_texts = args.texts or (64 if args.quick else 1024)
    texts = interleaved_texts(data, n_texts)
    # the shortest task's texts too (ATIS queries): no request there pays for the longest task's length
    shortest = min(cfg.task_names, key=lambda t: sum(len(r["text"]) for r in data[t].splits["test"])
                   / max(1, len(data[t].splits["test"])))
    short_texts = [r["text"] for r in data[shortest].splits["test"]][:n_texts]
    with phase(f"serving: {len(texts)} requests wanting all {k} tasks"):
        serve = serving(runs["multi"].model_dir, {t: runs[t].model_dir for t in cfg.task_names}, texts,
                        32, 2 if args.quick else 3, short_texts)
    serve["short_texts_from"] = shortest
    print(f"  requests/s: multi {serve['multi_task']['requests_per_s']}, four single "
          f"{serve['single_task_x4']['requests_per_s']} -> {serve['speedup']}×; {shortest} texts only: "
          f"{serve.get('short_speedup')}×", flush=True)
    targets.append(target("serving_requests_per_s_multi_over_four_single", serve["speedup"], 3.0, ">=", "×"))

    loop_multi = run_history_loop_s(runs["multi"].run_dir)
    loop_single = [run_history_loop_s(runs[t].run_dir) for t in cfg.task_names]
    figures = {
        "config": args.config or ("configs/quick.yaml" if args.quick else "configs/atis_sentiment_news.yaml"),
        "train_rows_per_task": {t: len(data[t].splits["train"]) for t in cfg.task_names},
        "test_rows_per_task": {t: len(data[t].splits["test"]) for t in cfg.task_names},
        "multi_task_steps": steps,
        "single_task_steps_each": steps // k,
        "batch_size": cfg.train.batch_size,
        "eval_every": {"multi": eval_every, "single": max(1, eval_every // k)},
        "per_task": per_task,
        "training_time_s": {
            "multi_task_fit": runs["multi"].fit_s,
            "single_task_fits_sum": round(sum(runs[t].fit_s for t in cfg.task_names), 1),
            "multi_task_wall": round(multi_wall, 1),
            "single_task_wall_sum": round(single_wall, 1),
            "multi_task_loop": round(loop_multi, 1) if loop_multi else None,
            "single_task_loops_sum": round(sum(loop_single), 1) if all(loop_single) else None,
        },
        "best_step": {name: r["best_step"] for name, r in runs.items()},
        "serving": serve,
    }
    if not args.keep:
        shutil.rmtree(out_root, ignore_errors=True)
    import ray

    ray.shutdown()
    return write_result(NAME, "One 4-task model vs four single-task models", args, figures, targets, notes=[
        "Budget: the multi-task run trains S steps round_robin (S/4 batches per task); each single-task run "
        "S/4 steps at the same batch size, lr, warm-up ratio and schedule shape; validation at the same "
        "per-task progress; early stopping off; best checkpoint by validation objective.",
        "Batch order: each run's BatchStream is seeded by (seed, task position), so single-task runs (task "
        "at position 0) see the same rows per epoch in a different order than the multi-task run, except "
        "the first task.",
        "Training time: fit_s from run_training (Ray fit incl. worker start-up and checkpoints); "
        "loop = examples ÷ samples_per_s from each run's history (steps + validations only).",
        "Serving: in-process Predictor, batches of 32 texts, each text wants all tasks; best of passes. "
        "The target uses the test sets interleaved; short_* repeats it on the shortest task's texts only.",
        "Quick mode trains a few steps on slices: its metrics are noise, only the mechanics are checked.",
    ])


if __name__ == "__main__":
    main()
