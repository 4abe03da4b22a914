"""The whole pipeline as a Ray job on a real `ray start --head` cluster, and the registered model
as an MLflow pyfunc."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{env.get('PATH', '')}",
    })
    env.pop("RAY_ADDRESS", None)
    return env


def tiny_quick_config(tmp: Path, encoder: Path) -> Path:
    """configs/quick.yaml, shrunk: the tiny encoder, 60-row slices, a 1-trial sweep (sweeps of
    several trials, ASHA and resume are tests/tune's)."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "quick.yaml").read_text())
    raw["name"] = "job-test"
    raw["output_dir"] = str(tmp / "runs")
    raw["model"] = {"encoder": str(encoder), "max_length": 32}
    for task in raw["tasks"]:
        task["max_examples"] = 60
        task.pop("max_length", None)
    raw["train"].update({"batch_size": 8, "max_steps": 8, "eval_every": 4, "cpus_per_worker": 1,
                         "lr": 1e-3, "head_lr": 1e-3})
    raw["tune"].update({"num_samples": 1, "max_concurrent": 1, "grace_period": 1})
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "job-test",
                     "registered_model": "job-test-model"}
    path = tmp / "job" / "quick-tiny.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _pids_with(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def stop_cluster(temp_dir: str, timeout: float = 30.0) -> None:
    """Stop only the processes of the cluster whose temp dir is ``temp_dir`` (Linux /proc). `ray
    stop` would kill every Ray on the machine, the test session's own among them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_with(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + timeout
        while _pids_with(temp_dir) and time.time() < deadline:
            time.sleep(0.5)
        if not _pids_with(temp_dir):
            return


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head` on 127.0.0.1 with its own ports and temp dir; only it is stopped afterwards."""
    env = cluster_env()
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash = free_port(), free_port()
    # every fixed default port moved, so a Ray already running here (the test session's) cannot
    # hold the new node's agent ports ("No available agent to submit job")
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=4",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                    "--disable-usage-stats", f"--temp-dir={temp_dir}", *ports],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", env
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.extended  # about 100 s: a `ray start` cluster and a whole job (opt-in, .ci/run runs it)
def test_ray_job_submit_runs_the_pipeline_and_registers_champion(tmp_path, tiny_encoder, ray_cluster):
    from mlflow.tracking import MlflowClient

    dashboard, gcs, env = ray_cluster
    config = tiny_quick_config(tmp_path, tiny_encoder)
    env = {**env, "RAY_API_SERVER_ADDRESS": dashboard, "RAY_ADDRESS": gcs}
    for _ in range(12):  # the dashboard's job agent comes up a few seconds after `ray start`
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--no-wait",
             "--working-dir", str(config.parent), "--", "mtl-ray", "run", "--config", config.name],
            env=env, capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = next(w for line in submit.stdout.splitlines() for w in line.split("'") if w.startswith("raysubmit_"))
    status, deadline = "", time.time() + 900
    while time.time() < deadline:
        out = subprocess.run([str(BIN / "ray"), "job", "status", "--address", dashboard, job_id],
                             env=env, capture_output=True, text=True, timeout=120).stdout
        # `ray job status` prints "Job '<id>' succeeded" or "Status for job '<id>': FAILED"
        status = next((s.upper() for s in ("succeeded", "failed", "stopped") if s in out.lower()), "")
        if status:
            break
        time.sleep(5)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", dashboard, job_id],
                          env=env, capture_output=True, text=True, timeout=120).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "[run] register" in logs and "job-test-model@champion" in logs

    # the registry too: an earlier test in the session may have set MLflow's global registry URI
    db = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    version = client.get_model_version_by_alias("job-test-model", "champion")
    tags = version.tags
    for task in ("intent", "slots", "sentiment", "topic"):
        metric = "f1" if task == "slots" else "accuracy"
        value = float(tags[f"test.{task}.{metric}"])
        assert 0.0 <= value <= 1.0
    # the champion's tags are the test metrics the pipeline printed
    summary = json.loads(logs[logs.index("{\n", logs.index("[run] register")):logs.rindex("}") + 1])
    assert float(tags["test.intent.accuracy"]) == pytest.approx(summary["test_metrics"]["intent"]["accuracy"], abs=1e-4)
    assert summary["registered_version"] == version.version


def test_registered_model_loads_as_pyfunc_with_predictor_answers(tmp_path, tiny_artifact):
    import mlflow
    import pandas as pd

    from mtl.config import config_from_dict
    from mtl.predictor import Predictor
    from pipelines import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config_from_dict({"tasks": [{"name": "t", "kind": "regression", "source": {"type": "bbc"}}],
                            "mlflow": {"tracking_uri": uri, "experiment": "pyfunc", "registered_model": "pyf"}})
    run_id = tracking.start_run(cfg, "pyfunc")
    model_uri = tracking.log_model(run_id, tiny_artifact)
    tracking.register(model_uri, "pyf")
    tracking.end_run(run_id)

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/pyf@champion")
    texts = ["show me flights from boston to denver", "a   dull,  lifeless film", "Shares fell 3% today."]
    out = loaded.predict(pd.DataFrame({"text": texts}))
    expected = Predictor.load(tiny_artifact).predict(texts)
    assert list(out.columns) == ["intent", "slots", "sentiment", "topic", "error"]
    assert out["error"].isna().all()
    for i, row in enumerate(expected):
        for task, answer in row.items():
            assert json.loads(out.iloc[i][task]) == answer
