"""What every benchmark shares: machine and version facts, targets, timing, and the JSON it writes.

A result file (benchmarks/results/<name>.json) holds::

    benchmark, title, date (UTC ISO), command (exact command line), git_commit, quick,
    machine {platform, processor, cpu_model, cpu_count, simd, ram_gib, torch_threads, gpu,
             load_average_start, load_average_end},
    versions {python, torch, ray, transformers, datasets, mlflow, tokenizers, numpy},
    figures {...}            every number measured, with units in the key names
    targets [{name, value, target, op, unit, met, note}]   met is null where not measured
    notes [...]              how it was measured, and caveats
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_CONFIG = ROOT / "configs" / "quick.yaml"
FULL_CONFIG = ROOT / "configs" / "atis_sentiment_news.yaml"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.ray_utils import set_ray_env  # noqa: E402

set_ray_env()
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # no per-dataset execution lines in the summaries
_LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------- command line


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in a few minutes on 2 cores")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: os.cpu_count())")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/<name>.json)")
    return p


def command_line() -> str:
    """The exact command that ran this process."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    argv = list(argv)
    try:
        exe = Path(argv[0])
        if exe.is_absolute() and exe.is_relative_to(ROOT):
            argv[0] = str(exe.relative_to(ROOT))
    except (ValueError, OSError):
        pass
    return shlex.join(argv)


def threads(args) -> int:
    return int(args.threads or os.cpu_count() or 1)


# ---------------------------------------------------------------- facts about the machine


def device():
    """cuda when there is one, else cpu (never hard-coded)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev=None) -> None:
    import torch

    if torch.cuda.is_available() and (dev is None or getattr(dev, "type", str(dev)) == "cuda"):
        torch.cuda.synchronize()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _simd() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]
    return [f for f in wanted if f in flags]


def machine_info() -> dict[str, Any]:
    import torch

    ram = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "simd": _simd(),
        "ram_gib": ram,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "load_average_start": round(_LOAD_AT_START, 1) if _LOAD_AT_START is not None else None,
        "load_average_end": round(load_end, 1) if load_end is not None else None,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "ray", "transformers", "datasets", "mlflow", "tokenizers", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- targets and results


def target(name: str, value: float | None, threshold: float, op: str = ">=", unit: str = "",
           note: str = "") -> dict[str, Any]:
    """A target: ``value op threshold``; ``met`` is None when the value was not measured."""
    ops: dict[str, Callable[[float, float], bool]] = {
        ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
    }
    met = None if value is None else bool(ops[op](float(value), threshold))
    return {"name": name, "value": None if value is None else round(float(value), 4), "target": threshold,
            "op": op, "unit": unit, "met": met, "note": note}


def write_result(name: str, title: str, args, figures: dict[str, Any], targets: list[dict[str, Any]],
                 notes: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    report = {
        "benchmark": name,
        "title": title,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": git_commit(),
        "quick": bool(getattr(args, "quick", False)),
        "machine": machine_info(),
        "versions": versions(),
        "figures": figures,
        "targets": targets,
        "notes": notes or [],
        **extra,
    }
    out = Path(args.out) if getattr(args, "out", None) else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    print_targets(targets)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)
    return report


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def print_targets(targets: list[dict[str, Any]]) -> None:
    for t in targets:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = "n/a" if t["value"] is None else f"{t['value']:g}"
        print(f"  target {t['name']}: {value} {t['op']} {t['target']:g}{t['unit']} -> {state}", flush=True)


# ---------------------------------------------------------------- timing


class Timer:
    """``with Timer() as t: ...; t.s`` (synchronises CUDA around the block when there is one)."""

    def __enter__(self) -> Timer:
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync()
        self.s = time.perf_counter() - self.t0


def best_of(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of ``fn``: best, median and mean over ``repeats`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        times.append(t.s)
    return {"best_s": min(times), "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "repeats": repeats}


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.perf_counter() - t0:.1f}s", flush=True)


# ---------------------------------------------------------------- configs and data


def load_cfg(path: str | Path, overrides: list[str] | None = None):
    """A RunConfig from YAML + ``key=value`` overrides; MLflow off unless an override says otherwise."""
    from mtl.config import load_config

    return load_config(path, ["mlflow.enabled=false", *(overrides or [])])


def cap_splits(data: dict, caps: dict[str, int | None]) -> dict:
    """A copy of ``read_tasks`` output with each split cut to at most ``caps[split]`` rows (first rows)."""
    from dataclasses import replace

    out = {}
    for name, td in data.items():
        splits = {s: (rows[:caps[s]] if caps.get(s) else rows) for s, rows in td.splits.items()}
        out[name] = replace(td, splits=splits)
    return out


def primary_metric(kind: str, labels: list[str]) -> str:
    from mtl.tasks import make_kind

    return make_kind(kind, labels).primary_metric


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the trainer's hot loop without Ray


def tokenize_arrays(cfg, data: dict, splits: tuple[str, ...] = ("train", "validation")) -> dict:
    """{task: {split: arrays}} with the exact function Ray Data maps (``pipelines.data.Tokenize``),
    in ``idx`` order: the arrays a Ray Train worker materialises from its dataset shard; and for
    each shared input (``RunConfig.inputs``) {name: {"train": arrays}} from ``TokenizeInput``."""
    import numpy as np

    from mtl.packages import resolve_encoder
    from mtl.readers import input_rows
    from pipelines.data import Tokenize, TokenizeInput, shared_inputs, task_infos
    from pipelines.sources import plain_input_rows

    tok_dir = str(resolve_encoder(cfg.model.encoder))
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    bs = cfg.data.tokenize_batch_size

    def tokenized(fn, rows: list[dict], label_columns: list[str]) -> dict[str, np.ndarray]:
        parts = []
        for i in range(0, len(rows), bs):
            chunk = rows[i:i + bs]
            parts.append(fn({"text": np.asarray([r["text"] for r in chunk], dtype=object),
                             **{c: [r[c] for r in chunk] for c in label_columns},
                             "idx": np.asarray([r["idx"] for r in chunk])}))
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(arrays["idx"], kind="stable")
        return {k: v[order] for k, v in arrays.items()}

    infos = task_infos(cfg, data)
    for info in infos:
        fn = Tokenize(tok_dir, info)
        # driver-held or read back from Ray Data
        out[info.name] = {split: tokenized(fn, list(data[info.name].rows(split)), ["label"]) for split in splits}
    for name, tasks in shared_inputs(cfg).items():
        fn = TokenizeInput(tok_dir, [i for i in infos if i.name in tasks])
        first = data[tasks[0]]  # driver-held (embedded ATIS) or read where it lies (Ray Data)
        rows = plain_input_rows(first, "train") if hasattr(first, "input_dataset") else \
            input_rows({t: data[t] for t in tasks}, "train")
        out[name] = {"train": tokenized(fn, rows, [f"label.{t}" for t in tasks])}
    return out


class PlainLoop:
    """The trainer's ``mtl.engine.Engine`` in this process (world 1, no Ray, no DDP), built from the
    config as a Ray worker builds it, so step k trains on the same rows as the worker's step k.
    Adds what the benchmarks count: tokens computed, real tokens and Σ batch × length²."""

    def __init__(self, cfg, infos, arrays: dict, encoder_dir: str, dev=None):
        from mtl.engine import Engine, EngineConfig
        from mtl.model import MultiTaskModel

        tc = cfg.train
        self.cfg, self.tc = cfg, tc
        self.device = dev or device()
        model = MultiTaskModel.from_encoder(encoder_dir, infos, seed=tc.seed)
        config = EngineConfig.from_train(tc, task_weights={t.name: t.weight for t in cfg.tasks})
        self.engine = Engine(model, arrays, config, device=self.device, inputs=cfg.inputs)
        self.module = self.engine.raw  # the TrainModule
        self.names = self.engine.names
        self.tokens = 0  # token positions computed (after trimming shared padding)
        self.real_tokens = 0  # non-padding tokens
        self.seq_sq = 0  # Σ batch × length² (the attention term's size)

    @property
    def examples(self) -> int:
        return self.engine.examples

    def _count(self) -> None:
        """Shapes of the micro-batches the next step will draw (the engine's own ``batch``)."""
        e = self.engine
        for t in e.sampler.tasks_for_step(e.step):
            for a in range(e.config.grad_accum):
                ids, mask, _ = e.batch(t, e.consumed[t] + a)
                self.tokens += ids.numel()
                self.real_tokens += int(mask.sum())
                self.seq_sq += ids.shape[0] * ids.shape[1] ** 2

    def step(self, timings: dict[str, float] | None = None) -> None:
        """One optimizer step; ``timings`` accumulates seconds of forward+backward and of the
        optimizer (clipping, AdamW, schedule)."""
        self._count()
        t0 = time.perf_counter()
        losses = self.engine.compute_gradients()
        sync(self.device)
        t1 = time.perf_counter()
        self.engine.apply_gradients(losses)
        sync(self.device)
        if timings is not None:
            timings["forward_backward"] = timings.get("forward_backward", 0.0) + t1 - t0
            timings["optimizer"] = timings.get("optimizer", 0.0) + time.perf_counter() - t1

    def evaluate(self) -> dict[str, dict[str, float]]:
        """The trainer's validation pass (same batching and metrics)."""
        return self.engine.evaluate()
