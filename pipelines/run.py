"""The whole pipeline as one Ray job.

    mtl-ray run --config configs/quick.yaml                 # in-process: an embedded local Ray
    mtl-ray run --config configs/quick.yaml --serve         # ... then serve the champion, print a sample
    ray job submit --working-dir . -- mtl-ray run --config configs/quick.yaml \\
        output_dir=$PWD/runs mlflow.tracking_uri=sqlite:///$PWD/mlflow.db   # on a running cluster

data (read, split, report) -> sweep (or one training run when the config has no ``tune:``) ->
test-set evaluation of the winner -> MLflow registration as ``champion`` -> optionally Serve.
With ``mlflow.enabled: false`` nothing is registered: the winner's model directory is printed and
served instead of ``models:/<name>@champion``.
Each stage prints one line with counts and elapsed time. Outputs go to a new timestamped folder
under ``output_dir/name``, so a re-run never overwrites an earlier one.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mtl.config import RunConfig
from mtl.tracking import absolute_tracking_uri
from pipelines.publish import RunResult

SAMPLE_TEXTS = [
    "show me flights from boston to denver tomorrow morning",
    "A warm, funny and beautifully acted film.",
]


def _stage(name: str, t0: float, detail: str) -> None:
    print(f"[run] {name:<9} {detail} ({time.time() - t0:.0f}s elapsed)", flush=True)


def results_table(test_metrics: dict[str, dict[str, float]]) -> str:
    lines = ["| task | metric | test |", "|---|---|---|"]
    for task, metrics in test_metrics.items():
        for k, v in metrics.items():
            lines.append(f"| {task} | {k} | {v:.4f} |")
    return "\n".join(lines)


def champion_reference(cfg: RunConfig, result: RunResult) -> str:
    """What to serve and print: the registry alias when the model was registered, else (MLflow
    disabled) the local model directory."""
    if result.registered_version is not None:
        return f"models:/{cfg.mlflow.registered_model}@champion"
    if not result.model_dir:
        raise RuntimeError("the run produced neither a registered model nor a model directory")
    return str(result.model_dir)


def run_pipeline(cfg: RunConfig, serve: bool = False, data: dict | None = None) -> RunResult:
    """Returns the sweep's (mode "sweep") or the training run's (mode "train") ``RunResult``; prints
    its summary with ``champion`` (what is served) and ``pipeline_wall_s`` (data read included)."""
    from pipelines.data import read_tasks, summarize
    from pipelines.ray_utils import init_ray
    from pipelines.train import check_train_config

    t0 = time.time()
    check_train_config(cfg)
    data = data or read_tasks(cfg)
    rows = sum(d.size(s) for d in data.values() for s in ("train", "validation", "test"))
    _stage("data", t0, f"{len(data)} tasks, {rows:,} rows")
    print(summarize(cfg, data), flush=True)
    init_ray()
    if cfg.tune is not None:
        from pipelines.tuning import run_tune

        _stage("sweep", t0, f"{cfg.tune.num_samples} trials, {cfg.tune.search} search, ASHA")
        result = run_tune(cfg, data=data)
    else:
        from pipelines.train import run_training

        _stage("train", t0, f"{cfg.train.max_steps} steps, {cfg.train.num_workers} worker(s)")
        result = run_training(cfg, data=data, register_model=True)
    champion = champion_reference(cfg, result)
    if result.registered_version is not None:
        _stage("register", t0, f"{champion} -> version {result.registered_version}")
    else:
        _stage("model", t0, f"{champion} (MLflow disabled: not registered)")
    print(results_table(result.test_metrics), flush=True)
    shown = {**result.summary(), "champion": champion, "pipeline_wall_s": round(time.time() - t0, 1)}
    print(json.dumps(shown, indent=2, default=str), flush=True)
    if serve:
        from pipelines.serving import run_server

        _stage("serve", t0, f"{champion} on http://{cfg.serve.host}:{cfg.serve.port}")
        url = run_server(champion, cfg, tracking_uri=absolute_tracking_uri(cfg.mlflow.tracking_uri), blocking=False)
        print(f"[run] sample: POST {url}/v1/predict {json.dumps({'texts': SAMPLE_TEXTS})}", flush=True)
        print(json.dumps(sample_request(url, SAMPLE_TEXTS), indent=2), flush=True)
        print("[run] serving until Ctrl-C", flush=True)
        _block_until_interrupt()
    return result


def sample_request(url: str, texts: list[str]) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(f"{url}/v1/predict", data=json.dumps({"texts": texts}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _block_until_interrupt() -> None:
    from ray import serve

    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        serve.shutdown()
