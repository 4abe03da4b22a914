"""pipelines.serving.run_server and pipelines.run's choice of what to serve (no Ray here: its calls
are replaced)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mtl.config import ConfigError, config_from_dict


def _cfg(mlflow_enabled: bool = True, tune: bool = False, serve: dict | None = None):
    raw = {"tasks": [{"name": "t", "kind": "sequence_classification", "source": {"type": "bbc"}}],
           "mlflow": {"enabled": mlflow_enabled, "registered_model": "m"}, "serve": serve or {}}
    if tune:
        raw["tune"] = {"num_samples": 2}
    return config_from_dict(raw)


def _result(model_dir: str, run_dir: str, **kw):
    from pipelines.publish import RunResult

    return RunResult(mode="train", run_dir=run_dir, model_dir=model_dir, mlflow_run_id=None, best_step=4,
                     best_objective=0.5, steps=8, stopped_early=False, samples_per_s=None, wall_s=1.0, fit_s=1.0,
                     test_metrics={"t": {"accuracy": 0.5}}, **kw)


@pytest.mark.slow
def test_run_server_serves_the_artifact_on_the_configs_address(ray_session, tiny_artifact):
    """A real Serve: the command line's None values mean the config's serve section (host, port);
    the application answers there under its name at ``/``, with the artifact as its model."""
    import socket

    import httpx
    from ray import serve

    from pipelines.serving import run_server
    from serve.app import APP_NAME

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = _cfg(mlflow_enabled=False, serve={"port": port, "min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5,
                                            "max_texts": 3})
    try:
        url = run_server(str(tiny_artifact), cfg, host=None, port=None, quantize=None, tracking_uri=None,
                         blocking=False)
        assert url == f"http://127.0.0.1:{port}"
        status = serve.status().applications[APP_NAME]
        assert status.status == "RUNNING"
        with httpx.Client(base_url=url, timeout=60) as client:
            tasks = client.get("/v1/tasks")
            assert tasks.status_code == 200 and tasks.json()["model"] == str(tiny_artifact)
            assert [t["name"] for t in tasks.json()["tasks"]] == ["intent", "slots", "sentiment", "topic"]
            r = client.post("/v1/predict", json={"texts": ["fly from boston to denver"], "tasks": ["intent"]})
            assert r.status_code == 200 and set(r.json()["predictions"][0]) == {"intent"}
            # the config's serve.max_texts reached the replica's request limits
            too_many = client.post("/v1/predict", json={"texts": ["a"] * 4})
            assert too_many.status_code == 413 and "the limit is 3" in too_many.json()["detail"]
    finally:
        serve.shutdown()


@pytest.mark.parametrize("model", ["models:/m@champion", "runs:/abc/model"])
def test_serving_an_mlflow_model_with_mlflow_disabled_is_a_config_error(model):
    from pipelines.serving import run_server

    with pytest.raises(ConfigError, match=r"^mlflow\.enabled: false, but the model"):
        run_server(model, _cfg(mlflow_enabled=False), blocking=False)


@pytest.mark.parametrize("tune", [False, True])
def test_run_with_mlflow_disabled_prints_and_serves_the_model_dir(monkeypatch, capsys, tmp_path, tune):
    """Bug: `mtl-ray run --serve` with MLflow disabled printed and served models:/...@champion,
    which was never registered."""
    import pipelines.data
    import pipelines.ray_utils
    import pipelines.run as run
    import pipelines.serving
    import pipelines.train
    import pipelines.tuning

    model_dir = str(tmp_path / "model")
    trained = _result(model_dir, str(tmp_path))  # what run_training / run_tune return without MLflow
    served = {}
    monkeypatch.setattr(pipelines.data, "read_tasks", lambda cfg: {})
    monkeypatch.setattr(pipelines.data, "summarize", lambda cfg, data: "")
    monkeypatch.setattr(pipelines.ray_utils, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(pipelines.train, "run_training", lambda cfg, **kw: trained)
    monkeypatch.setattr(pipelines.tuning, "run_tune", lambda cfg, **kw: replace(trained, mode="sweep"))
    monkeypatch.setattr(pipelines.serving, "run_server", lambda model, cfg, **kw: served.setdefault("model", model) and "http://x")
    monkeypatch.setattr(run, "sample_request", lambda url, texts: {})
    monkeypatch.setattr(run, "_block_until_interrupt", lambda: None)
    result = run.run_pipeline(_cfg(mlflow_enabled=False, tune=tune), serve=True)
    out = capsys.readouterr().out
    assert result.mode == ("sweep" if tune else "train")
    assert served["model"] == model_dir
    printed = json.loads(out[out.index("{\n"):out.index("\n}\n") + 2])
    assert printed["champion"] == model_dir and printed["mode"] == result.mode
    assert "models:/" not in out and f"{model_dir} (MLflow disabled: not registered)" in out


def test_champion_reference_is_the_alias_once_registered():
    from pipelines.run import champion_reference

    assert champion_reference(_cfg(), _result("/x", "/", registered_version="3")) == "models:/m@champion"
    assert champion_reference(_cfg(False), _result("/x", "/")) == "/x"
