"""The logged MLflow pyfunc model loads with ``mlflow.pyfunc.load_model`` in a fresh virtual
environment that holds only what the model declares (its requirements.txt; torch's CPU build
installed first, as ``make setup`` does) and nothing of this checkout: the ``mtl`` code comes with
the model. Isolated mode (``-I``), an empty PYTHONPATH and another working directory keep the
checkout and the development venv (where mtl-ray is installed editable) out of reach.

Slow: the environment is built by pip (torch from the local wheel, the rest through pip's cache),
about 4-5 minutes on a busy 2-core machine. It is kept under ``$MTL_RAY_TEST_VENVS`` (default
``~/.cache/mtl-ray/test-venvs``) keyed by the hash of the requirements, so later runs only load
the model (about 20 s); a change in what the model declares builds a new one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Opt-in (``pytest --run-extended``; .ci/run runs it after the suite): building the environment on
# a fresh machine takes minutes, more than the suite's budget.
pytestmark = [pytest.mark.slow, pytest.mark.extended]

LOAD = """
import importlib.util, json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"text": json.loads(sys.argv[2])}))
import mtl
print(json.dumps({"rows": out.to_dict(orient="records"), "mtl": mtl.__file__,
                  "pipelines": importlib.util.find_spec("pipelines") is not None, "ray": "ray" in sys.modules}))
"""


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = "/usr/bin:/bin"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def declared_venv(requirements_file: Path) -> Path:
    """A venv holding exactly ``requirements_file`` (torch's pin installed first, so pip takes the
    CPU build), built once per distinct requirements text; a half-built one is never reused."""
    text = requirements_file.read_text()
    root = Path(os.environ.get("MTL_RAY_TEST_VENVS", Path.home() / ".cache" / "mtl-ray" / "test-venvs"))
    venv = root / f"pyfunc-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    done = venv / "built-from-requirements.txt"  # written last: a venv without it is half-built
    if done.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(venv)], root)  # built at its final path: venvs do not move
    py = str(venv / "bin" / "python")
    try:
        torch_pin = next(r for r in text.split() if r.startswith("torch=="))
        _run([py, "-m", "pip", "install", "-q", torch_pin], root)  # the CPU build (a local wheel here)
        _run([py, "-m", "pip", "install", "-q", "-r", str(requirements_file)], root)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    done.write_text(text)
    return venv


def test_logged_model_loads_in_a_fresh_venv_from_its_declared_requirements(tmp_path, tiny_artifact):
    import mlflow

    from mtl.config import config_from_dict
    from mtl.predictor import Predictor
    from pipelines import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config_from_dict({"tasks": [{"name": "t", "kind": "regression", "source": {"type": "bbc"}}],
                            "mlflow": {"tracking_uri": uri, "experiment": "pyfunc-env"}})
    run_id = tracking.start_run(cfg, "pyfunc-env")
    model_uri = tracking.log_model(run_id, tiny_artifact)
    tracking.end_run(run_id)
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "model")))
    requirements = (local / "requirements.txt").read_text().split()
    assert "mtl-ray" not in " ".join(requirements)
    assert sorted(requirements) == sorted(tracking.model_requirements())
    assert (local / "code" / "mtl" / "predictor.py").is_file()

    py = str(declared_venv(local / "requirements.txt") / "bin" / "python")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    texts = ["show me flights from boston to denver", "a dull, lifeless film"]
    out = json.loads(_run([py, "-I", "-c", LOAD, str(local), json.dumps(texts)], elsewhere).stdout.splitlines()[-1])
    assert out["mtl"].startswith(str(local / "code" / "mtl")), out["mtl"]  # the model's copy, not the checkout
    assert not out["pipelines"] and not out["ray"]
    expected = Predictor.load(tiny_artifact).predict(texts)
    for row, answers in zip(out["rows"], expected):
        assert row.pop("error") is None and set(row) == set(answers)
        for task, answer in answers.items():
            got = json.loads(row[task])
            if "label" in answer:
                assert got["label"] == answer["label"] and got["score"] == pytest.approx(answer["score"], abs=1e-5)
            else:
                assert got.keys() == answer.keys()
