"""``mtl-ray serve``: Ray started (or joined) the pipelines' way, then the Serve application of
``serve.app`` on it.

    mtl-ray serve --model models:/mtl-ray-quick@champion      # HTTP on 127.0.0.1:8000
    mtl-ray serve --model runs/quick/sweep-<time>/model       # an artifact directory, no MLflow needed
"""

from __future__ import annotations

import os
import time

from mtl.config import ConfigError, RunConfig


def is_mlflow_uri(model: str) -> bool:
    """``models:/...``, ``runs:/...`` or another ``scheme://`` reference (not a local directory)."""
    return "://" in model or model.startswith(("models:/", "runs:/"))


def run_server(model: str, cfg: RunConfig | None = None, host: str | None = None, port: int | None = None,
               quantize: bool | None = None, tracking_uri: str | None = None, blocking: bool = True) -> str:
    """Serve ``model`` (artifact directory, models:/ or runs:/ URI) on Ray Serve; returns the base URL.
    With ``blocking``, waits until Ctrl-C, then deletes the application. A config with
    ``mlflow.enabled: false`` serves artifact directories only."""
    from ray import serve

    from pipelines.ray_utils import init_ray
    from serve.app import (
        APP_NAME,
        build_app,
        default_tracking_uri,
        http_options,
        ingress_env,
        resolve_model,
        serve_spec,
    )

    if cfg is not None and not cfg.mlflow.enabled and is_mlflow_uri(model):
        raise ConfigError(f"mlflow.enabled: false, but the model {model!r} is an MLflow reference; "
                          "serve an artifact directory or enable MLflow")
    spec = serve_spec(cfg, host, port, quantize)
    tracking_uri = tracking_uri or default_tracking_uri(cfg)
    model_dir, version = resolve_model(model, tracking_uri)
    # before Ray starts: a local Ray's processes inherit it (a cluster has it from its own start)
    os.environ.update(ingress_env(spec))
    ray = init_ray()
    serve.start(http_options=http_options(spec))
    serve.run(build_app(str(model_dir), spec, model_name=model, tracking_uri=tracking_uri, version=version),
              name=APP_NAME, route_prefix="/")
    url = f"http://{spec.host}:{spec.port}"
    print(f"mtl-ray: serving {model} at {url}  (POST {url}/v1/predict, GET {url}/v1/tasks, "
          f"{url}/healthz, docs {url}/docs)", flush=True)
    print(f"  curl -s {url}/v1/predict -H 'content-type: application/json' "
          "-d '{\"texts\": [\"book a flight from boston to denver\"]}'", flush=True)
    if not blocking:
        return url
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("mtl-ray: stopping", flush=True)
        try:
            if os.environ.get("RAY_ADDRESS", "local") in ("", "local"):
                # the local Ray init_ray started: Serve, its replicas and HAProxy go down with it
                # (deleting the app first would wait out HAProxy's 30 s replica drain for nothing)
                ray.shutdown()
            else:
                serve.delete(APP_NAME)  # on a cluster: replicas drain out of HAProxy's rotation first
        except KeyboardInterrupt:
            print("mtl-ray: stopped without waiting for the application to drain", flush=True)
    return url
