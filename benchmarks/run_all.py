"""Run every benchmark, then write BENCHMARKS.md from the JSON files in benchmarks/results/.

    python -m benchmarks.run_all --quick          # make bench-quick: every script with --quick
    python -m benchmarks.run_all                  # make bench: full sizes (hours on 2 cores)
    python -m benchmarks.run_all --report-only    # only rewrite BENCHMARKS.md from the JSON files
    python -m benchmarks.run_all --only mfu,comm_hook

Scripts run one after another, each in its own process with a Ray of its own (``init_ray``: a new
local Ray unless RAY_ADDRESS names a cluster); a failure is recorded and the rest go on: train_overhead, mfu,
data_tokenize, comm_hook, quantization, mtl_vs_single, benchmarks/serve_load.py when it is there,
and any other benchmarks/*.py (each takes --quick). BENCHMARKS.md gets a table of every target
(value, met or missed, date), each benchmark's headline figures with the machine, versions and the
exact command, and keeps the hand-written "What limits it" section between its markers as it is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, command_line, git_commit, machine_info, versions

SCRIPTS = ["train_overhead", "mfu", "data_tokenize", "comm_hook", "quantization", "mtl_vs_single"]
SERVE_LOAD = ROOT / "benchmarks" / "serve_load.py"
REPORT = ROOT / "BENCHMARKS.md"
BEGIN = "<!-- BEGIN HAND-WRITTEN: run_all keeps everything between these markers -->"
END = "<!-- END HAND-WRITTEN -->"
DEFAULT_HAND_WRITTEN = """## What limits it

(Hand-written. For each missed target: what limits it, from the profile, and what would close the gap.)
"""


NOT_SCRIPTS = {"__init__", "common", "run_all", "serve_load", "add_task_unchanged"}  # the last needs two artifacts


def scripts() -> list[str]:
    """The known scripts in order, then any other benchmarks/*.py (each takes --quick)."""
    others = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in {*SCRIPTS, *NOT_SCRIPTS})
    return [*SCRIPTS, *others]


def commands(quick: bool) -> dict[str, list[str]]:
    out = {name: [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if quick else [])] for name in scripts()}
    if SERVE_LOAD.is_file():
        extra = ["--quick"] if quick else ["--int8", "--kill"]
        if not quick:
            from benchmarks.quantization import find_model

            model, _ = find_model()
            if model is not None:
                extra += ["--model", str(model)]
        out["serve_load"] = [sys.executable, str(SERVE_LOAD.relative_to(ROOT)), *extra]
    return out


def run_one(name: str, cmd: list[str], timeout: float) -> dict[str, Any]:
    print(f"\n===== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"[{name}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)  # the script's own session: it, its Ray and its children
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    reader.join(timeout=10)
    seconds = time.time() - t0
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    print(f"===== {name}: {status} in {seconds:.0f}s", flush=True)
    return {"name": name, "command": " ".join(cmd), "rc": rc, "status": status, "seconds": round(seconds, 1),
            "tail": list(tail) if status != "ok" else []}


# ---------------------------------------------------------------- the report


def _load_results() -> dict[str, dict]:
    out = {}
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem == "run_all":
            continue
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _flat(d: dict, prefix: str = "", depth: int = 2) -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 1:
            out.extend(_flat(v, key + ".", depth - 1))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((key, v))
    return out


def _machine_line(m: dict) -> str:
    gpu = m.get("gpu")
    gpu_s = f", GPU {gpu['name']}" if isinstance(gpu, dict) else ""
    load = m.get("load_average_start"), m.get("load_average_end") or m.get("load_average_1m_at_end")
    load_s = f"; load average {_fmt(load[0])} → {_fmt(load[1])}" if any(x is not None for x in load) else ""
    return (f"{m.get('cpu_model') or m.get('processor')}, {m.get('cpu_count')} cores"
            + (f" ({', '.join(m['simd'])})" if m.get("simd") else "")
            + (f", {m['ram_gib']} GiB RAM" if m.get("ram_gib") else "")
            + (f", torch threads {m['torch_threads']}" if m.get("torch_threads") else "")
            + gpu_s + load_s + f"; {m.get('platform')}")


def _versions_line(v: dict) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items() if val)


def _serve_load_section(r: dict) -> list[str]:
    lines = []
    for b in r.get("in_process", []):
        lines.append(f"- in process ({b.get('backend', 'torch')} {'int8' if b.get('quantized') else 'fp32'}): "
                     f"{_fmt(b.get('texts_per_s_batch32'))} texts/s at batch 32, "
                     f"{_fmt(b.get('texts_per_s_batch1'))} texts/s one at a time")
    sc = r.get("scenarios", [])
    if sc:
        lines += ["", "| scenario | concurrent | req/s | p50 ms | p99 ms | errors | replicas (max) | mean batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in sc:
            concurrency = s.get("concurrency", (r.get("load") or {}).get("concurrency"))
            lines.append(f"| {s.get('scenario')} | {_fmt(concurrency)} | {_fmt(s.get('req_per_s'))} | "
                         f"{_fmt(s.get('p50_ms'))} | {_fmt(s.get('p99_ms'))} | {_fmt(s.get('errors'))} | "
                         f"{_fmt((s.get('replicas') or {}).get('max_running'))} | "
                         f"{_fmt((s.get('batches') or {}).get('mean_batch'))} |")
    if r.get("model"):
        lines.append(f"\nModel: {r['model']}; load: {_fmt(r.get('load'))}")
    return lines


def _special(name: str, r: dict) -> list[str]:
    f = r.get("figures", {})
    lines: list[str] = []
    if name == "mfu" and f.get("profile"):
        prof = f["profile"]
        lines += ["", f"Top operators ({prof.get('by')}, {prof.get('steps')} profiled steps; matmul ops "
                  f"{_fmt(100 * prof.get('matmul_share', 0))} % of self time, optimizer step "
                  f"{_fmt(100 * prof.get('optimizer_step_share_cpu', 0))} %):", "",
                  "| op | self ms | share | calls |", "|---|---|---|---|"]
        for op in prof.get("top_ops", [])[:10]:
            lines.append(f"| `{op['op']}` | {_fmt(op['self_ms'])} | {_fmt(100 * op['share'])} % | {op['calls']} |")
    if name in ("mtl_vs_single", "quantization"):
        per_task = f.get("per_task") or (f.get("metrics") or {}).get("per_task")
        if per_task:
            cols = [k for k in next(iter(per_task.values())) if k != "metric"]
            lines += ["", "| task | metric | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
            for t, v in per_task.items():
                lines.append(f"| {t} | {v['metric']} | " + " | ".join(_fmt(v[c]) for c in cols) + " |")
    return lines


def _hand_written() -> str:
    if REPORT.is_file():
        text = REPORT.read_text()
        if BEGIN in text and END in text:
            return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n") + "\n"
    return DEFAULT_HAND_WRITTEN


def write_report(run: dict | None = None) -> Path:
    results = _load_results()
    known = [*scripts(), "serve_load"]
    order = [n for n in known if n in results] + sorted(set(results) - set(known))
    statuses = {s["name"]: s for s in (run or {}).get("scripts", [])}
    started = (run or {}).get("started")
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks.run_all` from benchmarks/results/*.json; edit only the",
        "     hand-written section between the markers near the end: run_all keeps it. -->",
        "",
        "How close the system is to the machine (MFU, Ray Train overhead, tokenization, communication) and to",
        "its peers (plain PyTorch, `datasets.map`, four single-task models, fp32). Each figure comes from one",
        "script in `benchmarks/` (run it alone with `python -m benchmarks.<name> [--quick]`); `make bench-quick`",
        "runs them all with small sizes, `make bench` with full ones. No test asserts a time.",
        "",
    ]
    if run:
        lines += [f"Last `run_all`: {run['started']} ({'quick' if run['quick'] else 'full'}), "
                  f"{run['seconds']:.0f} s, `{run['command']}`, commit {run.get('git_commit')}.", ""]
        for part in run.get("partial_runs", []):
            lines += [f"Re-run since: {', '.join(part['scripts'])} at {part['started']} (`{part['command']}`).", ""]
        bad = [s for s in run["scripts"] if s["status"] != "ok"]
        if bad:
            lines += ["Did not finish in that run: " + ", ".join(f"{s['name']} ({s['status']}, rc {s['rc']})"
                                                                 for s in bad) + ".", ""]
    lines += ["## Targets", "",
              "| benchmark | target | value | wanted | result | mode | date (UTC) |",
              "|---|---|---|---|---|---|---|"]
    for name in order:
        r = results.get(name)
        if not r:
            continue
        mode = "quick" if r.get("quick") or "--quick" in r.get("command", "") else "full"
        date = r.get("date", "")[:16].replace("T", " ")
        stale = started and r.get("date", "") < started
        targets = r.get("targets") or []
        if not targets:
            lines.append(f"| {name} | (no target: informational) | | | | {mode} | {date}{' (stale)' if stale else ''} |")
        for t in targets:
            res = {True: "met", False: "**missed**", None: "not measured"}[t.get("met")]
            lines.append(f"| {name} | {t['name']} | {_fmt(t.get('value'))}{t.get('unit', '')} | "
                         f"{t['op']} {_fmt(t['target'])}{t.get('unit', '')} | {res} | {mode} | "
                         f"{date}{' (stale)' if stale else ''} |")
    lines += ["", "## Runs", "",
              "| benchmark | date (UTC) | command | machine | torch / ray / transformers |", "|---|---|---|---|---|"]
    for name in order:
        r = results[name]
        m, v = r.get("machine", {}), r.get("versions", {})
        load = m.get("load_average_end") or m.get("load_average_1m_at_end")
        lines.append(f"| {name} | {r.get('date', '')[:16].replace('T', ' ')} | `{r.get('command')}` | "
                     f"{m.get('cpu_count')} cores{', ' + m['gpu']['name'] if isinstance(m.get('gpu'), dict) else ''}"
                     f"{f', load {load}' if load is not None else ''} | "
                     f"{v.get('torch')} / {v.get('ray')} / {v.get('transformers')} |")
    lines.append("")
    for name in order:
        r = results.get(name)
        if not r:
            continue
        st = statuses.get(name)
        lines += [f"## {name}: {r.get('title', '')}".rstrip(": "), ""]
        if st and st["status"] != "ok":
            lines += [f"> Last run_all: **{st['status']}** (rc {st['rc']}); the figures below are from an earlier "
                      "run." if r.get("date", "") < (started or "") else f"> Last run_all: {st['status']}.", ""]
        lines += [f"- command: `{r.get('command')}`",
                  f"- date: {r.get('date')}, commit {r.get('git_commit', 'n/a')}",
                  f"- machine: {_machine_line(r.get('machine', {}))}",
                  f"- versions: {_versions_line(r.get('versions', {}))}", ""]
        if name.startswith("serve_load") and "figures" not in r:
            lines += _serve_load_section(r)
        else:
            figs = [(k, v) for k, v in _flat(r.get("figures", {})) if not k.startswith(("profile.", "matmul_by_size"))]
            if figs:
                lines += ["| figure | value |", "|---|---|"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in figs[:40]]
            lines += _special(name, r)
            if r.get("notes"):
                lines += ["", *[f"- {n}" for n in r["notes"]]]
        lines.append("")
    lines += [BEGIN, _hand_written().rstrip("\n"), END, ""]
    REPORT.write_text("\n".join(lines))
    return REPORT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every script with --quick")
    p.add_argument("--only", default=None, help="comma-separated scripts to run")
    p.add_argument("--skip", default="", help="comma-separated scripts to leave out")
    p.add_argument("--timeout", type=float, default=None, help="seconds per script (quick 900, full 14400)")
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite BENCHMARKS.md")
    args = p.parse_args(argv)
    run = None
    if not args.report_only:
        cmds = commands(args.quick)
        names = args.only.split(",") if args.only else list(cmds)
        unknown = set(names) - set(cmds)
        if unknown:
            p.error(f"unknown script(s) {sorted(unknown)}; have {sorted(cmds)}")
        names = [n for n in names if n not in set(args.skip.split(","))]
        timeout = args.timeout or (900 if args.quick else 14400)
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        t0 = time.time()
        done = [run_one(n, cmds[n], timeout) for n in names]
        run = {"started": started, "quick": args.quick, "seconds": round(time.time() - t0, 1),
               "command": command_line(), "git_commit": git_commit(), "machine": machine_info(),
               "versions": versions(), "scripts": done}
        previous = RESULTS / "run_all.json"
        if (args.only or args.skip) and previous.is_file():
            # a partial run: keep the last full run's record of the scripts not run now
            old = json.loads(previous.read_text())
            if old.get("quick") == args.quick:
                # the old order; re-run scripts replaced in place, new ones appended
                merged = {s["name"]: s for s in old["scripts"]} | {d["name"]: d for d in done}
                run["scripts"] = list(merged.values())
                run["started"] = old["started"]
                run["partial_runs"] = [*old.get("partial_runs", []), {"started": started, "command": run["command"],
                                                                      "scripts": sorted(d["name"] for d in done)}]
                run["command"], run["seconds"] = old["command"], old["seconds"] + run["seconds"]
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "run_all.json").write_text(json.dumps(run, indent=2) + "\n")
    elif (RESULTS / "run_all.json").is_file():
        run = json.loads((RESULTS / "run_all.json").read_text())
    path = write_report(run)
    print(f"\nwrote {path.relative_to(ROOT)}", flush=True)
    if run:
        for s in run["scripts"]:
            print(f"  {s['name']:<16} {s['status']:<8} {s['seconds']:>7.0f}s", flush=True)
        return 0 if all(s["status"] == "ok" for s in run["scripts"]) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
