"""Where a request's CPU goes in the Ray Serve application: a sampling profile (py-spy) of the
replica and of Serve's HTTP proxy while a load runs, split into cost centres, plus each process's
CPU time per request (/proc/<pid>/stat, before/after the load). Writes benchmarks/results/serve_profile.json
and prints a summary; asserts nothing.

    python benchmarks/serve_profile.py                       # tiny model, 1500 requests, 32 concurrent
    python benchmarks/serve_profile.py --model runs/quick/<run>/model --requests 1000

Needs ``py-spy`` on PATH or beside the interpreter (``pip install py-spy``; not a project
dependency) and the right to ptrace the Ray worker processes (same user). Without it only the CPU
time per request per process is reported.

How samples are split: each sampled stack (idle threads left out, so a sample is a thread on CPU)
goes to the first cost centre found walking from the innermost frame outwards (``CENTRES``):
so a ``json.dumps`` called by FastAPI counts as JSON, a torch module called by our predictor as the
torch forward, and a frame of Serve's own code (``ray/serve/``) only when nothing more specific is
below it. Shares are of the process's samples; ``ms/request`` multiplies a share by the process's
measured CPU seconds over the load divided by the requests answered. The load generator (httpx in
this process) shares the cores; its CPU per request is reported too.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402  (sets Ray's environment)

# (cost centre, path fragments of a frame's file); the first centre matching a frame wins, frames
# are tried innermost first, and "generic" centres only count when no specific one is on the stack
OUR_METRICS = "metrics: ours (serve/metrics.py and the Ray API under it)"
CENTRES: list[tuple[str, tuple[str, ...]]] = [
    ("metrics: Serve's own (Ray metric API)", ("/ray/util/metrics.py", "/ray/serve/metrics.py",
                                               "/ray/serve/_private/metrics_utils.py")),
    ("tokenizer", ("/tokenizers/", "/transformers/tokenization", "/transformers/tokenization_utils")),
    ("torch forward", ("/torch/", "/transformers/")),
    ("JSON", ("/json/", "/orjson", "/fastapi/encoders.py")),
    ("pydantic validation", ("/pydantic/", "/pydantic_core/", "/fastapi/_compat")),
    ("ASGI / FastAPI / Starlette", ("/starlette/", "/fastapi/", "/fastapi_offline/", "/anyio/")),
    ("our code: predictor", ("/mtl/",)),
    ("our code: app and schema", ("/serve/app.py", "/serve/schema.py")),
    ("HTTP server (uvicorn/h11/httptools)", ("/uvicorn/", "/h11/", "/httptools/", "/http/")),
    ("Serve proxy / router / replica", ("/ray/serve/",)),
    ("Ray core (pickle, RPC, actors)", ("/ray/", "/pickle", "/cloudpickle", "/grpc/", "/google/protobuf")),
]
GENERIC: list[tuple[str, tuple[str, ...]]] = [
    ("asyncio / threads / other", ("/asyncio/", "/threading.py", "/concurrent/", "/selectors.py", "/contextvars")),
]


def _frame_file(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``/path/file.py`` (a leading slash, so fragments match whole names)."""
    if frame.endswith(")") and " (" in frame:
        where = frame[frame.rindex(" (") + 2:-1]
        return "/" + where.rsplit(":", 1)[0].lstrip("/")
    return "/" + frame


def _is_ray_file(path: str, fragment: str) -> bool:
    # our serve/app.py and serve/schema.py must not match anything under ray/
    return fragment.startswith("/serve/") and "/ray/" in path


# innermost frames that are a loop or thread entry calling straight into native code (Ray's core
# worker task loop, uvloop's run_forever, a thread whose target is a C function, a pool thread's
# queue wait): their samples are native work (or waits py-spy took for work) with no Python frame
NATIVE = "native: core worker / uvloop / thread waits (no Python frame)"
NATIVE_ENTRIES = ("Worker.main_loop ", "_run_user_code_event_loop ", "_run_router_event_loop ", "Thread.run ",
                  "_worker (")
# which centres are whose, for the summary
GROUPS = {
    "ours: model (torch, tokenizer, predictor)": ("torch forward", "tokenizer", "our code: predictor"),
    "ours: app, schema and metrics": ("our code: app and schema", OUR_METRICS),
    "libraries on our app's path (FastAPI, pydantic, JSON)": ("ASGI / FastAPI / Starlette", "pydantic validation",
                                                              "JSON"),
}


def group_of(centre: str) -> str:
    return next((g for g, cs in GROUPS.items() if centre in cs), "Ray / Serve / runtime (not ours)")


def _ours(path: str, fragment: str) -> bool:
    return path.endswith(fragment) and "/ray/" not in path


def centre_of(stack: list[str]) -> str:
    """The cost centre of one sampled stack (outermost frame first)."""
    if any(_ours(_frame_file(f), "/serve/metrics.py") for f in stack):
        return OUR_METRICS
    if stack and stack[-1].startswith(NATIVE_ENTRIES):
        return NATIVE
    for table in (CENTRES, GENERIC):
        for frame in reversed(stack):
            path = _frame_file(frame)
            for name, fragments in table:
                if any(f in path and not _is_ray_file(path, f) for f in fragments):
                    return name
    return "other"


def read_raw(path: Path) -> tuple[Counter, dict[str, Counter]]:
    """py-spy's ``--format raw`` (collapsed stacks: ``frame;frame;... count``) as {centre: samples},
    and per centre {innermost frame: samples}."""
    out: Counter = Counter()
    inner: dict[str, Counter] = {}
    if not path.exists():
        return out, inner
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        centre = centre_of(frames)
        out[centre] += int(count)
        inner.setdefault(centre, Counter())[frames[-1]] += int(count)
    return out, inner


def top_frames(path: Path, fragment: str, n: int = 8) -> list[tuple[str, int]]:
    """The innermost frames under ``fragment`` (e.g. our files) by samples: what in our code costs."""
    out: Counter = Counter()
    if not path.exists():
        return []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        for frame in reversed(stack.split(";")):
            if fragment in _frame_file(frame) and "/ray/" not in _frame_file(frame):
                out[frame] += int(count)
                break
    return out.most_common(n)


class _StubService:
    """What make_api needs, answering at once with a fixed 4-task answer (no model): the ingress alone."""

    model_name, model_version = "stub", "1"
    task_names = ["intent", "slots", "sentiment", "topic"]
    ANSWER = {"intent": {"label": "flight", "score": 0.93},
              "slots": {"entities": [{"type": "fromloc", "text": "boston", "start": 17, "end": 23, "score": 0.88}],
                        "tags": ["O", "O", "O", "B-fromloc", "O", "B-toloc"]},
              "sentiment": {"label": "positive", "score": 0.71}, "topic": {"label": "travel", "score": 0.64}}

    def describe(self):
        return [{"name": t, "kind": "sequence_classification", "labels": ["a"]} for t in self.task_names]

    async def predict(self, texts, tasks, top_k):
        return [{t: self.ANSWER[t] for t in tasks} for _ in texts], self.model_version


def ingress_in_process(n: int) -> dict:
    """CPU per request of the replica's ASGI app alone (GuardMiddleware, FastAPI routing, request
    validation, the endpoint, response serialisation), called directly in this process with a stub
    service: no Ray, no HTTP server, no model. cProfile's own time per function, split by CENTRES."""
    import cProfile
    import pstats

    from mtl.config import ServeSpec
    from serve.app import make_api

    app = make_api(_StubService(), ServeSpec())
    body = b'{"texts": ["book a flight from boston to denver tomorrow morning"]}'
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000)}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    async def many(k):
        for _ in range(k):
            await app(dict(scope), receive, send)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(many(50))  # warm-up (route compilation, lazy imports)
    assert sent[0]["status"] == 200, sent[:2]
    t0 = time.process_time()
    loop.run_until_complete(many(n))
    cpu_us = 1e6 * (time.process_time() - t0) / n
    prof = cProfile.Profile()
    prof.enable()
    loop.run_until_complete(many(n))
    prof.disable()
    loop.close()
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
    by_centre: Counter = Counter()
    for (file, _, func), (_, _, tottime, _, _) in stats.items():
        by_centre[centre_of([f"{func} ({file}:0)"])] += tottime
    total = sum(by_centre.values()) or 1.0
    return {"requests": n, "cpu_us_per_request": round(cpu_us, 1), "body": body.decode(),
            "centres_share_cprofile": {c: round(v / total, 4) for c, v in by_centre.most_common()},
            "response": json.loads(b"".join(m.get("body", b"") for m in sent[1:2]) or b"null")}


def find_processes() -> dict[str, int]:
    """pids of the replica and the proxy (Ray names its worker processes ``ray::<Actor>``), from /proc."""
    found: dict[str, int] = {}
    for entry in sorted(Path("/proc").iterdir(), key=lambda e: e.name):
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica:" in cmd and "MultiTaskPredictor" in cmd:
            found.setdefault("replica", int(entry.name))
        elif "ProxyActor" in cmd:
            found.setdefault("proxy", int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(p) for p in [Path(sys.executable).with_name("py-spy")] if p.exists()), None)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--model", help="artifact directory or models:/ URI (default: build the tiny test model)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--keep-raw", default=None, help="folder to keep py-spy's raw stacks in")
    p.add_argument("--ingress-only", action="store_true", help="only the in-process ASGI app (no Ray)")
    p.add_argument("--ingress-requests", type=int, default=3000)
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 600)

    from ray import serve

    from benchmarks.serve_load import _load, build_tiny_artifact
    from mtl.config import ServeSpec
    from mtl.registry import local_artifact
    from pipelines.ray_utils import init_ray
    from serve.app import APP_NAME, build_app, http_options

    ingress = ingress_in_process(args.ingress_requests)
    print(f"ingress in process (stub service): {ingress['cpu_us_per_request']} us CPU per request")
    for c, v in ingress["centres_share_cprofile"].items():
        print(f"  {c:<58}{100 * v:6.1f} %")
    if args.ingress_only:
        return common.write_result("serve_profile", "Where a request's CPU goes (ingress only, in process)", args,
                                   {"ingress_in_process": ingress}, [], ["cProfile, stub service, no Ray"])
    tmp = tempfile.TemporaryDirectory(prefix="serve-profile-")
    if args.model:
        model_ref, model_dir = args.model, str(local_artifact(args.model, args.tracking_uri))
    else:
        model_ref = "tiny-untrained (tests/conftest.py)"
        model_dir = str(build_tiny_artifact(Path(tmp.name)))
    spy = py_spy()
    init_ray(log_to_driver=False, include_dashboard=False)
    port = common.free_port()
    serve.start(http_options=http_options(ServeSpec(host="127.0.0.1", port=port)))
    spec = ServeSpec(max_batch_size=args.max_batch_size, batch_wait_timeout_s=0.01, min_replicas=1, max_replicas=1,
                     max_ongoing_requests=max(128, 2 * args.concurrency), max_texts=64)
    serve.run(build_app(model_dir, spec, model_name=model_ref), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    asyncio.run(_load(url, 50, 4, 1))  # warm-up
    pids = find_processes()
    procs = {**pids, "load generator (httpx)": os.getpid()}
    spies, raws = {}, {}
    if spy:
        for name, pid in pids.items():
            raws[name] = Path(args.keep_raw or tmp.name) / f"{name}.txt"
            raws[name].parent.mkdir(parents=True, exist_ok=True)
            spies[name] = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format",
                                            "raw", "--nonblocking", "--output", str(raws[name])],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(2)  # py-spy attaches
    before = {n: cpu_seconds(pid) for n, pid in procs.items()}
    load_start = os.getloadavg()[0]
    result = asyncio.run(_load(url, args.requests, args.concurrency, 1))
    cpu_s = {n: cpu_seconds(pid) - before[n] for n, pid in procs.items()}
    load_end = os.getloadavg()[0]
    spy_errors = {}
    for name, proc in spies.items():
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode not in (0, -signal.SIGINT, 130) or not raws[name].exists():
            spy_errors[name] = err.decode(errors="replace")[-500:]
    serve.shutdown()
    import ray

    ray.shutdown()

    ok = max(1, result["ok"])
    processes = {}
    for name in procs:
        ms = 1000 * cpu_s[name] / ok
        entry = {"pid": procs[name], "cpu_s": round(cpu_s[name], 2), "cpu_ms_per_request": round(ms, 3)}
        if name in raws:
            samples, inner = read_raw(raws[name])
            total = sum(samples.values())
            entry["samples"] = total
            entry["centres"] = {c: {"share": round(n / total, 4), "ms_per_request": round(ms * n / total, 3),
                                    "top_innermost": [[f, k] for f, k in inner[c].most_common(4)]}
                                for c, n in samples.most_common()} if total else {}
            groups: Counter = Counter()
            for c, n in samples.items():
                groups[group_of(c)] += n
            entry["groups"] = {g: {"share": round(n / total, 4), "ms_per_request": round(ms * n / total, 3)}
                               for g, n in groups.most_common()} if total else {}
            entry["top_frames_ours"] = [{"frame": f, "samples": n} for f, n in
                                        top_frames(raws[name], "/serve/") + top_frames(raws[name], "/mtl/")]
        processes[name] = entry
    figures = {"ingress_in_process": ingress, "load": result, "cpu_ms_per_request_total": round(sum(e["cpu_ms_per_request"] for e in processes.values()), 3),
               "processes": processes, "load_average_during": [round(load_start, 1), round(load_end, 1)]}
    notes = [f"model: {model_ref}", f"py-spy: {spy or 'not found (no sampling profile)'}, {args.rate} Hz, "
             "--nonblocking, idle threads left out", "split rule: innermost matching frame (see CENTRES)"]
    if spy_errors:
        notes.append(f"py-spy errors: {spy_errors}")
    print(f"\n{result['ok']} requests in {result['wall_s']} s ({result['req_per_s']} req/s, p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms); load average {load_start:.1f} -> {load_end:.1f}")
    for name, e in processes.items():
        print(f"\n{name}: {e['cpu_ms_per_request']} ms CPU per request ({e.get('samples', 0)} samples)")
        for c, v in e.get("centres", {}).items():
            print(f"  {c:<58}{100 * v['share']:6.1f} %{v['ms_per_request']:9.3f} ms")
            for f, k in v["top_innermost"][:2]:
                print(f"      {k:6d}  {f}")
        for g, v in e.get("groups", {}).items():
            print(f"  = {g:<56}{100 * v['share']:6.1f} %{v['ms_per_request']:9.3f} ms")
        for f in e.get("top_frames_ours", [])[:10]:
            print(f"    ours: {f['samples']:6d}  {f['frame']}")
    tmp.cleanup()
    return common.write_result("serve_profile", "Where a request's CPU goes (replica and proxy, py-spy)", args,
                               figures, [], notes)


if __name__ == "__main__":
    main()
