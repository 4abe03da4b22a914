"""Load on the Ray Serve application over loopback HTTP: throughput, latency, errors, autoscaling,
batching on vs off for each backend (torch or ONNX Runtime, fp32 or int8), at one or several
concurrency levels, and a replica killed under load. Writes benchmarks/results/serve_load.json and
prints a summary; asserts nothing.

    python benchmarks/serve_load.py --quick                    # tiny model, 600 requests per scenario
    python benchmarks/serve_load.py --model runs/quick/model   # an artifact dir or models:/ URI
    python benchmarks/serve_load.py --requests 2000 --concurrency 32 --int8 --kill
    python benchmarks/serve_load.py --model runs/quick/model --client wrk --concurrency 64 \
        --only batched,batched-onnx-int8 --replicas 1   # wrk: apt-get install wrk
    python benchmarks/serve_load.py --model runs/quick/model --client wrk --concurrency 1,16,64 \
        --only batched,unbatched,batched-onnx-int8,unbatched-onnx-int8,kill-onnx-int8 --replicas 1

Without ``--model`` the tiny untrained test model is built (as tests/conftest.py does), so the numbers
show the serving overhead rather than a real encoder's cost. Every scenario is its own deployment
(autoscaling starts from ``min_replicas``). The in-process ``Predictor.predict`` throughput on the
same machine is the reference. The load generator shares the machine's cores with Serve.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.ray_utils import set_ray_env  # noqa: E402

set_ray_env()

SAMPLE_TEXTS = [
    "book a flight from boston to denver tomorrow morning",
    "what is the cheapest fare from pittsburgh to atlanta",
    "show me flights to new york on monday",
    "a gripping, beautifully acted film with a weak ending",
    "the worst two hours i have spent in a cinema",
    "shares in the bank fell sharply after the quarterly results",
    "the striker scored twice as the home side won the cup",
    "which airlines fly from dallas to san francisco",
]


# ---------------------------------------------------------------- the model


def build_tiny_artifact(dst: Path) -> Path:
    """The untrained tiny model of tests/conftest.py (tiny BERT, the quick config's four tasks)."""
    from transformers import AutoTokenizer

    from mtl.config import load_config
    from mtl.model import MultiTaskModel
    from pipelines.data import read_tasks, task_infos

    spec = importlib.util.spec_from_file_location("_mtl_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    encoder = conftest.build_tiny_encoder(dst / "tiny-bert")
    cfg = load_config(conftest.QUICK_CONFIG)
    model = MultiTaskModel.from_encoder(encoder, task_infos(cfg, read_tasks(cfg)), seed=0)
    return model.save(dst / "model", AutoTokenizer.from_pretrained(str(encoder)))


def in_process(model_dir: str, quantize: bool, n_texts: int, threads: int, backend: str = "torch") -> dict:
    """Predictor.predict throughput in this process: batches of 32 texts, and one text at a time,
    with ``threads`` torch threads (a replica gets as many as its num_cpus; on a busy 2-core machine
    two threads were 15x slower than one)."""
    import torch

    from mtl.predictor import Predictor

    torch.set_num_threads(threads)
    pred = Predictor.load(model_dir, quantize=quantize, backend=backend)
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(n_texts)]
    pred.predict(texts[:32])
    out = {"backend": backend, "quantized": quantize, "device": str(pred.device), "texts": n_texts,
           "torch_threads": torch.get_num_threads()}
    for batch in (32, 1):
        n = n_texts if batch > 1 else max(32, n_texts // 8)
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            pred.predict(texts[s:s + batch])
        out[f"texts_per_s_batch{batch}"] = round(n / (time.perf_counter() - t0), 1)
    return out


# ---------------------------------------------------------------- load


class ReplicaPoller(threading.Thread):
    """Polls serve.status() for the deployment's replica states while the load runs."""

    def __init__(self, app: str, deployment: str, period: float = 0.5):
        super().__init__(daemon=True)
        self.app, self.deployment, self.period = app, deployment, period
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stop_event = threading.Event()

    def run(self):
        from ray import serve

        t0 = time.perf_counter()
        while not self.stop_event.is_set():
            try:
                dep = serve.status().applications[self.app].deployments[self.deployment]
                states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
                self.samples.append((round(time.perf_counter() - t0, 2), states))
            except Exception:  # noqa: BLE001 - status can be briefly unavailable
                pass
            self.stop_event.wait(self.period)

    def summary(self) -> dict:
        running = [s.get("RUNNING", 0) for _, s in self.samples]
        changes, last = [], None
        for t, s in self.samples:
            if s != last:
                changes.append({"t_s": t, "states": s})
                last = s
        return {"max_running": max(running, default=0), "min_running": min(running, default=0),
                "samples": len(self.samples), "changes": changes}


async def _load(url: str, n: int, concurrency: int, texts_per_request: int, on_progress=None) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            for i in counter:
                texts = [SAMPLE_TEXTS[(i + j) % len(SAMPLE_TEXTS)] for j in range(texts_per_request)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", json={"texts": texts})
                    key = None if r.status_code == 200 else f"http {r.status_code}"
                except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the run
                    key = type(err).__name__
                if key is None:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[key] = errors.get(key, 0) + 1
                if on_progress is not None:
                    on_progress(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

    return {"requests": n, "ok": len(lat), "errors": sum(errors.values()), "error_kinds": errors,
            "wall_s": round(wall, 2), "req_per_s": round(len(lat) / wall, 1),
            "texts_per_s": round(len(lat) * texts_per_request / wall, 1),
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None}


WRK_SCRIPT = """-- POST /v1/predict with one of the sample bodies in turn (written by benchmarks/serve_load.py)
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  return wrk.format(nil, "/v1/predict", nil, bodies[(i %% #bodies) + 1])
end
"""


def _wrk_bodies(texts_per_request: int) -> list[str]:
    return [json.dumps({"texts": [SAMPLE_TEXTS[(i + j) % len(SAMPLE_TEXTS)] for j in range(texts_per_request)]})
            for i in range(len(SAMPLE_TEXTS))]


def _wrk_load(url: str, duration_s: float, concurrency: int, texts_per_request: int) -> dict:
    """``wrk`` (C, one thread: it costs the 2 cores far less than a Python client) for
    ``duration_s`` at ``concurrency`` open connections; rates, latency percentiles and non-2xx."""
    import re
    import shutil
    import subprocess

    if shutil.which("wrk") is None:
        raise SystemExit("--client wrk: wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    lua = WRK_SCRIPT % ", ".join(json.dumps(b) for b in _wrk_bodies(texts_per_request))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s:g}s", "--timeout", "30s", "--latency",
                          "-s", f.name, url], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)

    def ms(value: str, unit: str) -> float:
        return round(float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit], 1)

    pcts = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|90|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    wall = float(duration_s)
    ok = total - (int(bad.group(1)) if bad else 0)
    return {"requests": total, "ok": ok, "errors": errors, "wall_s": wall,
            "req_per_s": round(ok / wall, 1), "texts_per_s": round(ok * texts_per_request / wall, 1),
            "p50_ms": pcts.get("50"), "p90_ms": pcts.get("90"), "p99_ms": pcts.get("99"), "wrk_output": out}


def _kill_one_replica(app: str, deployment: str) -> str | None:
    """ray.kill one live replica actor of the deployment (found by its actor name, through the GCS:
    no State API, which needs the dashboard and an unambiguous address)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "serve" and a["name"].startswith(prefix))
    if not names:
        return None
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def replica_stats(app: str, tries: int = 12) -> list[dict]:
    """The counters of the replicas a few handle calls reach (deduplicated by replica)."""
    from ray import serve

    handle = serve.get_app_handle(app)
    seen = {}
    for _ in range(tries):
        try:
            s = handle.stats.remote().result(timeout_s=10)
            seen[s["replica"]] = s
        except Exception:  # noqa: BLE001
            break
    return list(seen.values())


def _counter_delta(before: list[dict], after: list[dict]) -> dict:
    """Requests and batches the replicas served between two ``replica_stats`` snapshots."""
    prev = {s["replica"]: s for s in before}
    requests = sum(s["requests"] - prev.get(s["replica"], {}).get("requests", 0) for s in after)
    batches = sum(s["batches"] - prev.get(s["replica"], {}).get("batches", 0) for s in after)
    return {"requests": requests, "batches": batches, "mean_batch": round(requests / batches, 2) if batches else None}


def run_scenario(name: str, model_dir: str, model_ref: str, port: int, args, **spec_fields) -> list[dict]:
    """One deployment of the scenario's spec, loaded at each of ``args.concurrency`` in turn (the
    kill scenario at the highest only); a result row per concurrency."""
    from ray import serve

    from mtl.config import ServeSpec
    from serve.app import APP_NAME, DEPLOYMENT_NAME, build_app

    levels = [max(args.concurrency)] if name.startswith("kill") else args.concurrency
    fields = {"max_batch_size": 32, "batch_wait_timeout_s": 0.01, "min_replicas": 1, "max_replicas": 2,
              "target_ongoing_requests": 8, "max_ongoing_requests": max(128, 2 * max(levels)),
              "max_texts": max(64, args.texts_per_request), **spec_fields}
    spec = ServeSpec(**fields)
    t0 = time.perf_counter()
    serve.run(build_app(model_dir, spec, model_name=model_ref), name=APP_NAME, route_prefix="/")
    deploy_s = time.perf_counter() - t0
    url = f"http://127.0.0.1:{port}"
    asyncio.run(_load(url, 20, 4, args.texts_per_request))  # warm-up
    rows = []
    for concurrency in levels:
        before = replica_stats(APP_NAME)
        poller = ReplicaPoller(APP_NAME, DEPLOYMENT_NAME)
        poller.start()
        killed: list[str | None] = []
        on_progress = None
        if name.startswith("kill"):
            at = args.requests // 3

            def on_progress(i, at=at, killed=killed):  # from the event loop: kill in a thread, the load goes on
                if i == at and not killed:
                    killed.append(None)
                    threading.Thread(target=lambda: killed.__setitem__(0, _kill_one_replica(APP_NAME, DEPLOYMENT_NAME)),
                                     daemon=True).start()
        print(f"  {concurrency} concurrent ...", flush=True)
        if args.client == "wrk" and not name.startswith("kill"):
            result = _wrk_load(url, args.duration, concurrency, args.texts_per_request)
        else:
            result = asyncio.run(_load(url, args.requests, concurrency, args.texts_per_request, on_progress))
        poller.stop_event.set()
        poller.join()
        stats = replica_stats(APP_NAME)
        row = {"scenario": name, "concurrency": concurrency, "spec": {k: fields[k] for k in sorted(fields)},
               "deploy_s": round(deploy_s, 1), **result, "replicas": poller.summary(),
               "batches": _counter_delta(before, stats), "replica_counters": stats}
        if killed:
            row["killed_replica"] = killed[0]
        rows.append(row)
        print(f"  {row['req_per_s']} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  errors {row['errors']}  "
              f"replicas max {row['replicas']['max_running']}  mean batch {row['batches']['mean_batch']}", flush=True)
    serve.delete(APP_NAME)
    return rows


# ---------------------------------------------------------------- main


BACKENDS = {"": {}, "-int8": {"quantize": True}, "-onnx": {"backend": "onnx"},
            "-onnx-int8": {"backend": "onnx", "quantize": True}}
# every backend batched and unbatched (max_batch_size 1), and one of two replicas killed a third into the load
ALL_SCENARIOS = [(f"{mode}{suffix}", {**backend, **extra}) for suffix, backend in BACKENDS.items()
                 for mode, extra in (("batched", {}), ("unbatched", {"max_batch_size": 1}))] + [
    (f"kill{suffix}", {**backend, "min_replicas": 2, "max_replicas": 2}) for suffix, backend in BACKENDS.items()]


def _levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency must be positive integers, comma-separated; got {text!r}")
    return levels


def _versions() -> dict:
    import ray
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "transformers": transformers.__version__}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="artifact directory or models:/ URI (default: build the tiny test model)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--requests", type=int, default=2000, help="requests per scenario")
    p.add_argument("--concurrency", type=_levels, default=[32],
                   help="concurrent requests; a comma-separated list (1,16,64) loads each deployment at each in turn")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--int8", action="store_true", help="also serve the int8 (dynamic quantization) model")
    p.add_argument("--kill", action="store_true", help="also kill one of two replicas a third into the load")
    p.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size=1 scenario")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the in-process reference (default 1: a replica's num_cpus)")
    p.add_argument("--only", default=None, help="comma-separated scenarios to run: batched or unbatched or kill, "
                   "then nothing (torch fp32), -int8, -onnx or -onnx-int8 (e.g. batched-onnx-int8)")
    p.add_argument("--client", choices=["httpx", "wrk"], default="httpx",
                   help="load generator: httpx (async Python, --requests) or wrk (C, --duration; "
                        "apt-get install wrk); the kill scenario always uses httpx")
    p.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                   help="serve.ingress: HAProxy in front of replicas that serve HTTP (the default), or Serve's Python proxy")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per scenario with --client wrk")
    p.add_argument("--replicas", type=int, default=None,
                   help="fixed replica count (min = max = initial) instead of autoscaling 1..2")
    p.add_argument("--quick", action="store_true", help="600 requests per scenario, with --kill")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 600)
        args.kill = True

    from mtl.registry import local_artifact

    tmp = None
    if args.model:
        model_ref = args.model
        model_dir = str(local_artifact(args.model, args.tracking_uri))
    else:
        tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
        print("building the tiny test model ...", flush=True)
        model_dir = str(build_tiny_artifact(Path(tmp.name)))
        model_ref = "tiny-untrained (tests/conftest.py)"

    selected = ["batched"] + ([] if args.no_unbatched else ["unbatched"]) + (["batched-int8"] if args.int8 else []) \
        + (["kill"] if args.kill else [])
    if args.only:
        selected = args.only.split(",")
        unknown = set(selected) - {name for name, _ in ALL_SCENARIOS}
        if unknown:
            p.error(f"--only: unknown scenario(s) {sorted(unknown)}")
    print("in-process Predictor ...", flush=True)
    n_texts = 256 if args.quick else 2048
    baseline = [in_process(model_dir, False, n_texts, args.threads)]
    if any(sc.endswith("-int8") and "onnx" not in sc for sc in selected):
        baseline.append(in_process(model_dir, True, n_texts, args.threads))
    for name, quantize in (("onnx", False), ("onnx-int8", True)):
        if any(sc.endswith(f"-{name}") for sc in selected):
            baseline.append(in_process(model_dir, quantize, n_texts, args.threads, backend="onnx"))

    from ray import serve

    from mtl.config import ServeSpec
    from pipelines.ray_utils import init_ray
    from serve.app import http_options, ingress_env

    os.environ.update(ingress_env(ServeSpec(ingress=args.ingress)))  # before Ray starts
    init_ray(log_to_driver=False)
    port = _free_port()
    serve.start(http_options=http_options(ServeSpec(host="127.0.0.1", port=port)))
    scenarios = [sc for sc in ALL_SCENARIOS if sc[0] in selected]
    results = []
    try:
        for name, fields in scenarios:
            if args.replicas and name != "kill":
                fields = {**fields, "min_replicas": args.replicas, "max_replicas": args.replicas}
            load = f"{args.duration:g} s" if args.client == "wrk" and not name.startswith("kill") else f"{args.requests} requests"
            print(f"scenario {name}: {load} at each of {args.concurrency} concurrent ...", flush=True)
            results += run_scenario(name, model_dir, model_ref, port, args, **fields)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    report = {
        "benchmark": "serve_load",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 1)},
        "versions": _versions(),
        "model": model_ref,
        "load": {"requests": args.requests if args.client == "httpx" else None,
                 "duration_s": args.duration if args.client == "wrk" else None, "concurrency": args.concurrency,
                 "texts_per_request": args.texts_per_request, "ingress": args.ingress,
                 "transport": "HTTP/1.1 loopback, " + ("httpx AsyncClient" if args.client == "httpx"
                                                       else "wrk 1 thread (Lua body)")},
        "in_process": baseline,
        "scenarios": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\nin process: " + "; ".join(
        f"{b['backend']} {'int8' if b['quantized'] else 'fp32'} {b['texts_per_s_batch32']} texts/s (batch 32), "
        f"{b['texts_per_s_batch1']} texts/s (one at a time)" for b in baseline))
    print(f"{'scenario':<20}{'conc':>5}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'replicas':>10}{'mean batch':>12}")
    for r in results:
        mean_batch = r["batches"]["mean_batch"]
        print(f"{r['scenario']:<20}{r['concurrency']:>5}{r['req_per_s']:>8}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['errors']:>8}"
              f"{r['replicas']['max_running']:>10}{'-' if mean_batch is None else mean_batch:>12}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
