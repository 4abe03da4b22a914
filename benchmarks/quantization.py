"""Backends of the serving path: torch fp32, torch int8, ONNX Runtime fp32 and int8 (CPU):
texts/s and test metrics per task, and ONNX's parity with torch.

    python -m benchmarks.quantization --quick                 # 128 texts; test sets cut to 100 rows
    python -m benchmarks.quantization --model runs/x/train-y/model
    python -m benchmarks.quantization                         # newest trained model under runs/

The model: ``--model DIR`` (an artifact), else the newest ``runs/*/train-*/model``, else the newest
model in a Ray checkpoint of a training run in progress (``runs/*/train-*/**/model``), else any
newest ``runs/**/model`` (Tune trials), else
(full run) the quick config trained for a while (``run_training``, MLflow off, outputs in a temp
dir), or (``--quick``) an untrained MiniLM-based artifact with the quick config's tasks: speed is
measured, metrics are marked not measured (an untrained model's metrics say nothing).

Speed: ``Predictor.load(dir, device="cpu", backend=..., quantize=...).predict`` on batches of 32 real test
texts (the tasks' test sets interleaved, so short ATIS queries, film reviews and long BBC articles)
asking for every task; best of N passes; int8 dynamic quantization is CPU-only, so both run on CPU.
Metrics: ``mtl.evaluation.test_report`` of both models on the test sets of the config the model
was trained with (``--config``, else the configs/*.yaml whose ``name`` is the folder under runs/); change in each task's
primary metric, in points, against torch fp32. Parity: ONNX fp32's labels/tags against torch fp32's
on the speed texts (all must agree) and the largest score difference. Targets: the fastest
backend ≥ 2.5× torch fp32; int8 drops ≤ 0.5 point on every task. ONNX needs ``mtl-ray[onnx]``.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    FULL_CONFIG,
    QUICK_CONFIG,
    ROOT,
    Timer,
    load_cfg,
    parser,
    phase,
    primary_metric,
    target,
    threads,
    write_result,
)

NAME = "quantization"
VARIANTS = (("torch-fp32", "torch", False), ("torch-int8", "torch", True),
            ("onnx-fp32", "onnx", False), ("onnx-int8", "onnx", True))


MODEL_SEARCH = (  # in order of preference: (glob under runs/, how the report names the find)
    ("*/train-*/model/manifest.json", "newest finished runs/*/train-*/model"),
    ("*/train-*/**/model/manifest.json", "newest checkpoint of a training run in progress"),
    ("**/model/manifest.json", "newest runs/**/model"),
)


def find_model(root: Path = ROOT / "runs") -> tuple[Path | None, str]:
    """The newest finished training run's model (runs/<name>/train-*/model); else the newest model in
    a checkpoint of a training run in progress (runs/<name>/train-*/**/model); else any newest
    runs/**/model (Tune trials included); else None. With how it was found."""
    if root.is_dir():
        for pattern, how in MODEL_SEARCH:
            found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1].parent, how
    return None, ""


def _run_name(model_dir: Path) -> str | None:
    """runs/<name>/... -> <name> (the config's ``name``; outputs go to output_dir/name/)."""
    path = model_dir.resolve()
    runs = (ROOT / "runs").resolve()
    if path.is_relative_to(runs) and len(path.relative_to(runs).parts) > 1:
        return path.relative_to(runs).parts[0]
    for parent in path.parents:
        if parent.name.startswith("train-"):
            return parent.parent.name
    return None


def config_for(model_dir: Path, explicit: str | None):
    """The config the artifact was trained with: ``--config``, else the configs/*.yaml whose ``name`` is
    the run folder's (runs/<name>/train-*/model), else the one whose task names match the manifest."""
    import yaml

    from mtl.model import read_manifest

    if explicit:
        return load_cfg(explicit)
    names = [t["name"] for t in read_manifest(model_dir)["tasks"]]
    candidates = sorted((ROOT / "configs").glob("*.yaml"))
    run_name = _run_name(model_dir)
    for path in candidates:
        raw = yaml.safe_load(path.read_text()) or {}
        if run_name and raw.get("name") == run_name:
            return load_cfg(path)
    for path in (FULL_CONFIG, QUICK_CONFIG):
        cfg = load_cfg(path)
        if cfg.task_names == names:
            return cfg
    return None


def untrained_artifact(cfg, data, dst: Path) -> Path:
    from transformers import AutoTokenizer

    from mtl.model import MultiTaskModel
    from mtl.packages import resolve_encoder
    from pipelines.data import task_infos

    enc = resolve_encoder(cfg.model.encoder)
    model = MultiTaskModel.from_encoder(enc, task_infos(cfg, data), seed=0)
    return model.save(dst / "model", AutoTokenizer.from_pretrained(str(enc)))


def interleaved_texts(data, n: int) -> list[str]:
    lists = [[r["text"] for r in td.splits["test"]] for td in data.values()]
    out, i = [], 0
    while len(out) < n and any(i < len(x) for x in lists):
        out.extend(x[i] for x in lists if i < len(x))
        i += 1
    return out[:n]


class TimedModel:
    """The predictor's model with the time spent inside its calls counted (``seconds``): what is
    the backend's, as against tokenizing, bucketing and decoding, which every backend shares."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.model(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.model, name)


def throughput(pred, texts: list[str], batch: int, passes: int) -> dict:
    pred.predict(texts[:batch])  # warm-up
    timed = pred.model = TimedModel(pred.model)
    best, best_model = float("inf"), 0.0
    try:
        for _ in range(passes):
            timed.seconds = 0.0
            with Timer() as t:
                for i in range(0, len(texts), batch):
                    pred.predict(texts[i:i + batch])
            if t.s < best:
                best, best_model = t.s, timed.seconds
    finally:
        pred.model = timed.model
    return {"texts_per_s": round(len(texts) / best, 2), "best_pass_s": round(best, 3), "passes": passes,
            "model_s": round(best_model, 3), "outside_model_s": round(best - best_model, 3)}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--model", help="artifact directory (default: newest runs/**/model)")
    p.add_argument("--config", help="the config the model was trained with (default: found from the run)")
    p.add_argument("--texts", type=int, default=None, help="texts per speed pass (quick 128, full 1024)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--test-rows", type=int, default=None, help="cap per task test set (quick 100, full: all)")
    args = p.parse_args(argv)
    import torch

    from mtl.evaluation import test_report
    from mtl.predictor import Predictor
    from pipelines.data import read_tasks

    n_threads = threads(args)
    torch.set_num_threads(n_threads)
    n_texts = args.texts or (128 if args.quick else 1024)
    test_rows = args.test_rows or (100 if args.quick else None)
    passes = 2 if args.quick else 3
    tmp = tempfile.TemporaryDirectory(prefix="bench-quant-")
    model_dir, source = (Path(args.model), "--model") if args.model else find_model()
    trained = True
    cfg = None
    if model_dir is not None:
        cfg = config_for(model_dir, args.config)
    elif args.quick:
        cfg = load_cfg(QUICK_CONFIG)
        model_dir = untrained_artifact(cfg, read_tasks(cfg), Path(tmp.name))
        source, trained = "untrained MiniLM + quick config heads (no trained model under runs/)", False
    else:
        from pipelines.ray_utils import init_ray
        from pipelines.train import run_training

        init_ray(log_to_driver=False)
        cfg = load_cfg(QUICK_CONFIG, [f"output_dir={tmp.name}", "train.max_steps=240"])
        with phase("no trained model found: training the quick config (240 steps)"):
            model_dir = Path(run_training(cfg).model_dir)
        source = "quick config trained here for 240 steps"
    if cfg is None:
        cfg = load_cfg(QUICK_CONFIG)
    data = read_tasks(cfg)
    texts = interleaved_texts(data, n_texts)
    print(f"model: {model_dir} ({source}); {len(texts)} texts, batch {args.batch}, {n_threads} threads", flush=True)

    speed, preds, answers = {}, {}, {}
    for name, backend, quantize in VARIANTS:
        if backend == "onnx" and importlib.util.find_spec("onnxruntime") is None:
            print(f"  {name}: skipped (pip install 'mtl-ray[onnx]')", flush=True)
            continue
        with phase(f"{name}: Predictor.predict"):
            preds[name] = Predictor.load(model_dir, device="cpu", backend=backend, quantize=quantize)
            speed[name] = throughput(preds[name], texts, args.batch, passes)
            answers[name] = preds[name].predict(texts[:256])
        print(f"  {name}: {speed[name]['texts_per_s']} texts/s", flush=True)
    base = speed["torch-fp32"]["texts_per_s"]
    speedups = {n: round(s["texts_per_s"] / base, 3) for n, s in speed.items()}
    # the backend's own speed-up: time inside the model's calls only (same texts, same buckets)
    model_speedups = {n: round(speed["torch-fp32"]["model_s"] / s["model_s"], 3) for n, s in speed.items()}
    fastest = max(speedups, key=speedups.get)
    parity = onnx_parity(answers["torch-fp32"], answers["onnx-fp32"]) if "onnx-fp32" in answers else None
    gpu_ref = None
    if torch.cuda.is_available():
        gpu_ref = throughput(Predictor.load(model_dir, device="cuda"), texts, args.batch, passes)

    # metrics on the test sets, when the model is trained and its labels match the data
    metrics, drop, why_not = {}, None, None
    ref = preds["torch-fp32"].model
    manifest_tasks = {t: (ref.tasks[t].kind, ref.tasks[t].labels) for t in preds["torch-fp32"].task_names}
    if not trained:
        why_not = "untrained model: metrics not measured"
    elif any(t not in data or data[t].labels != labels for t, (_, labels) in manifest_tasks.items()):
        why_not = f"the model's tasks/labels do not match config {cfg.name!r}: metrics not measured"
    else:
        rows = {t: data[t].splits["test"][:test_rows] if test_rows else data[t].splits["test"]
                for t in manifest_tasks}
        for name in preds:
            with phase(f"{name}: test_report on {sum(len(r) for r in rows.values())} test rows"):
                t0 = time.time()
                rep = test_report(preds[name].model, preds[name].tokenizer, rows, batch_size=64)
                metrics[name] = {t: r["metrics"] for t, r in rep.items()}
                metrics[name]["_seconds"] = round(time.time() - t0, 2)
        per_task = {}
        for t, (kind, labels) in manifest_tasks.items():
            m = primary_metric(kind, labels)
            a = metrics["torch-fp32"][t][m]
            per_task[t] = {"metric": m, **{n: round(100 * metrics[n][t][m], 2) for n in preds},
                           **{f"drop_pts_{n}": round(100 * (a - metrics[n][t][m]), 2) for n in preds if n != "torch-fp32"}}
            print(f"  {t} {m}: " + ", ".join(f"{n} {100 * metrics[n][t][m]:.2f}" for n in preds), flush=True)
        metrics["per_task"] = per_task
        drop = max(v[k] for v in per_task.values() for k in v if k.startswith("drop_pts_") and "int8" in k)
    tmp_note = source
    tmp.cleanup()

    figures = {
        "model": (str(model_dir.relative_to(ROOT)) if model_dir.is_relative_to(ROOT) else str(model_dir))
        if trained else tmp_note,
        "model_source": source,
        "trained": trained,
        "config": cfg.name,
        "threads": n_threads,
        "texts": len(texts),
        "batch": args.batch,
        "tasks_per_request": len(manifest_tasks),
        **speed,
        "fp32": speed["torch-fp32"],  # the names earlier results used
        "int8": speed["torch-int8"],
        "speedup_over_torch_fp32": speedups,
        "model_only_speedup_over_torch_fp32": model_speedups,
        "speedup_int8_over_fp32": speedups["torch-int8"],
        "fastest": fastest,
        "onnx_fp32_parity": parity,
        "fp32_cuda_reference": gpu_ref,
        "test_rows_per_task_cap": test_rows,
        "metrics": metrics or None,
        "max_metric_drop_pts": drop,
        "metrics_not_measured_because": why_not,
    }
    print("model calls alone: " + ", ".join(f"{n} {v:.2f}×" for n, v in model_speedups.items()), flush=True)
    print("speed-up over torch fp32: " + ", ".join(f"{n} {v:.2f}×" for n, v in speedups.items())
          + (f"; largest int8 metric drop {drop:.2f} pts" if drop is not None else f"; {why_not}")
          + (f"; onnx fp32 parity {parity}" if parity else ""), flush=True)
    return write_result(NAME, "Serving backends: torch / ONNX Runtime, fp32 / int8 (Predictor, CPU)", args, figures, [
        target("fastest_speedup", speedups[fastest], 2.5, ">=", "×", note=f"{fastest}; texts/s, batches of 32, all tasks"),
        target("max_int8_metric_drop", drop, 0.5, "<=", " pts",
               note=why_not or "largest per-task drop of the primary test metric, int8 vs torch fp32"),
        target("onnx_fp32_label_mismatches", parity["label_mismatches"] if parity else None, 0, "<=",
               note="labels/tags differing from torch fp32 on the speed texts"),
    ], notes=[
        "torch int8 = torch.ao.quantization.quantize_dynamic of the encoder's Linear layers (mtl.predictor); "
        "ONNX = encoder + all heads traced with eager attention (TorchScript exporter) and ONNX Runtime's BERT "
        "fusions (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), CPU provider; ONNX int8 = "
        "onnxruntime.quantization.quantize_dynamic (QInt8 weights) (mtl.onnx_backend).",
        "Every backend runs on CPU at the same thread count; speed is the best of the passes. model_s: the "
        "time inside the model's calls in that pass (the backend's part); outside_model_s: tokenizing, length "
        "buckets and decoding, the same code for every backend.",
        "Texts are the test sets interleaved (ATIS queries, Rotten Tomatoes reviews, BBC articles).",
    ])


def onnx_parity(want: list[dict], got: list[dict]) -> dict:
    """Labels/tags that differ between two backends' answers, and the largest score difference."""
    mismatches, worst = 0, 0.0
    for w, g in zip(want, got):
        for task, a in w.items():
            b = g[task]
            if "label" in a:
                mismatches += a["label"] != b["label"]
                worst = max(worst, abs(a["score"] - b["score"]))
            elif "tags" in a:
                mismatches += a["tags"] != b["tags"]
            elif "value" in a:
                worst = max(worst, abs(a["value"] - b["value"]))
    return {"texts": len(want), "label_mismatches": mismatches, "max_score_diff": worst}


if __name__ == "__main__":
    main()
