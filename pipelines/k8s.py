"""KubeRay manifests from a run config: a ``RayJob`` that runs the pipeline and a ``RayService``
that serves its champion, both derived from the same YAML so they never drift from it.

    mtl-ray k8s --config configs/atis_sentiment_news.yaml --image REGISTRY/mtl-ray:0.1.0-cpu \\
        --storage s3://BUCKET/mtl-ray --tracking-uri https://mlflow.example.com --out deploy/k8s
    kubectl create secret generic atis-sentiment-news-token --from-literal=token=$(openssl rand -hex 24)
    kubectl apply -f deploy/k8s/rayjob.yaml       # ConfigMap + RayJob: train, evaluate, register
    kubectl apply -f deploy/k8s/rayservice.yaml   # RayService: serve models:/<name>@champion

What comes from the config:

- ``rayjob.yaml``: a ConfigMap holding the config (mounted at ``CONFIG_DIR`` in the job's pods) and a
  RayJob whose entrypoint is ``mtl-ray run --config CONFIG_DIR/run.yaml`` with ``output_dir`` and
  ``mlflow.tracking_uri`` overridden to ``--storage`` and ``--tracking-uri``. One worker pod per
  Ray Train worker (``train.num_workers`` × ``tune.max_concurrent`` trials, default 1), each with
  ``train.cpus_per_worker`` + 1 CPUs, rounded up (the extra one for Ray Data tasks beside the training
  worker) and one ``nvidia.com/gpu`` when ``train.use_gpu`` is true (``auto``: CPU pods).
- ``rayservice.yaml``: a RayService whose ``serveConfigV2`` is the application of
  ``serve/serve_config.yaml`` (``serve.app:app_builder`` on ``models:/<registered_model>@champion``
  with the config's ``serve:`` section), on worker pods sized for one replica each, autoscaling
  between ``serve.min_replicas`` and ``serve.max_replicas``. The bearer token comes from a Secret
  into the containers' ``serve.token_env`` variable, never into the manifest.

Every pod also reads optional credentials (object storage, MLflow server) from the Secret
``<name>-credentials`` as environment variables (``envFrom``, optional). Results must outlive the
cluster, so object storage and an MLflow tracking server are required.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from mtl.config import HAPROXY_ENV, ConfigError, RunConfig, ServeSpec, apply_overrides, load_config

STORAGE_SCHEMES = ("s3://", "gs://", "abfs://", "abfss://")
TRACKING_SCHEMES = ("http://", "https://", "databricks")
CONFIG_DIR = "/home/ray/mtl-ray-config"  # where the ConfigMap is mounted in every pod
CONFIG_FILE = "run.yaml"
TOKEN_KEY = "token"  # key of the bearer token inside its Secret
SERVE_PORT = 8000
WORKER_MEMORY = "8Gi"  # per training worker pod; MiniLM-sized encoders need 3-4 GiB per worker
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}
SERVE_MEMORY = "4Gi"  # per serving replica pod
ACTIVE_DEADLINE_S = 24 * 3600  # the job is stopped after a day
TTL_AFTER_FINISHED_S = 3600  # the finished cluster is deleted an hour after the job ends
# the replicas' environment, as in serve/serve_config.yaml (no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:
# that loopback setting is for laptops; pods set it to 1)
SERVE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"}
POD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}


class ManifestError(ConfigError):
    """Manifests that would lose results or cannot run; the message names the flag or field."""


@dataclass(frozen=True)
class ClusterTarget:
    """Where the cluster runs and keeps its results (the ``mtl-ray k8s`` flags)."""

    image: str
    storage: str  # object storage URI for output_dir (checkpoints, reports, Tune state)
    tracking_uri: str  # MLflow tracking server every pod can reach
    name: str  # base name of the Kubernetes objects
    token_secret: str  # Secret holding the serving bearer token under TOKEN_KEY
    credentials_secret: str  # optional Secret with storage / MLflow credentials as env vars
    model: str  # what the RayService serves: models:/<registered_model>@champion or a pinned version


def k8s_name(text: str) -> str:
    """A DNS-1123 label from ``text`` (lower case, dashes; at most 40 characters, leaving room for suffixes)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-")
    if not name:
        raise ManifestError(f"name {text!r}: no letters or digits to name Kubernetes objects with")
    return name


def ray_version() -> str:
    """The installed Ray's version (the image's Ray must match; read without importing Ray)."""
    return metadata.version("ray")


def default_image(cfg: RunConfig) -> str:
    """``mtl-ray:<version>-gpu`` when training asks for GPUs, else ``-cpu`` (see deploy/Dockerfile)."""
    variant = "gpu" if cfg.train.use_gpu is True or cfg.serve.num_gpus > 0 else "cpu"
    return f"mtl-ray:{metadata.version('mtl-ray')}-{variant}"


def make_target(cfg: RunConfig, image: str | None = None, storage: str | None = None,
                tracking_uri: str | None = None, name: str | None = None, model: str | None = None) -> ClusterTarget:
    """The target from the flags (falling back to the config's ``output_dir`` and tracking URI);
    :class:`ManifestError` naming the flag when results would stay inside the cluster's pods."""
    storage = (storage or cfg.output_dir).rstrip("/")
    if not storage.startswith(STORAGE_SCHEMES):
        raise ManifestError(
            f"--storage: {storage!r} is a path inside a pod, lost when the cluster is deleted; give "
            f"object storage every pod can reach ({', '.join(STORAGE_SCHEMES)}), e.g. --storage s3://BUCKET/mtl-ray")
    tracking_uri = tracking_uri or cfg.mlflow.tracking_uri
    if not tracking_uri.startswith(TRACKING_SCHEMES):
        raise ManifestError(
            f"--tracking-uri: {tracking_uri!r} is not an MLflow tracking server; runs and the registered "
            "champion would stay in a pod and the RayService could not load the model. Give "
            "http(s)://HOST or databricks, e.g. --tracking-uri https://mlflow.example.com")
    if not cfg.mlflow.enabled:
        raise ManifestError("mlflow.enabled is false: the RayService serves the registered champion, "
                            "so the job must register it; set mlflow.enabled=true")
    model = model or f"models:/{cfg.mlflow.registered_model}@champion"
    if not model.startswith(("models:/", "runs:/")) and not model.startswith(STORAGE_SCHEMES):
        raise ManifestError(f"--model: {model!r} is not in the registry or object storage every replica can "
                            "reach; use models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model")
    base = k8s_name(name or cfg.name)
    return ClusterTarget(image=image or default_image(cfg), storage=storage, tracking_uri=tracking_uri,
                         name=base, token_secret=f"{base}-token", credentials_secret=f"{base}-credentials",
                         model=model)


def _cpu(n: float) -> str:
    """Whole CPUs, rounded up (at least 1): KubeRay gives Ray a whole CPU count derived from the
    pod's limit, so whole limits keep what Ray schedules equal to what Kubernetes reserves."""
    return str(max(1, math.ceil(n)))


def _resources(cpu: float, memory: str, gpus: int = 0) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": _cpu(cpu), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": dict(limits), "limits": limits}


def _container(target: ClusterTarget, name: str, resources: dict[str, Any],
               extra_env: list[dict[str, Any]] | None = None, with_config: bool = True) -> dict[str, Any]:
    env = [{"name": k, "value": v} for k, v in POD_ENV.items()] + copy.deepcopy(extra_env or [])
    return {
        "name": name,
        "image": target.image,
        "resources": resources,
        "env": env,
        "envFrom": [{"secretRef": {"name": target.credentials_secret, "optional": True}}],
        "ports": ([{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                   {"containerPort": 10001, "name": "client"}] if name == "ray-head" else [])
        + [{"containerPort": SERVE_PORT, "name": "serve"}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]
        + ([{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}] if with_config else []),
    }


def _pod(target: ClusterTarget, container: dict[str, Any], with_config: bool) -> dict[str, Any]:
    """A pod template: the container, RAM-backed /dev/shm for Ray's object store, and the config's ConfigMap."""
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if with_config:
        volumes.append({"name": "config", "configMap": {"name": f"{target.name}-config"}})
    return {"spec": {"containers": [container], "volumes": volumes}}


def _cluster(target: ClusterTarget, group: str, worker_resources: dict[str, Any], replicas: int,
             min_replicas: int, max_replicas: int, head_params: dict[str, str] | None = None,
             extra_env: list[dict[str, Any]] | None = None, with_config: bool = True) -> dict[str, Any]:
    """A RayCluster spec: one head and one worker group of ``replicas`` pods (between min and max)."""
    head = _container(target, "ray-head", _resources(float(HEAD_RESOURCES["cpu"]), HEAD_RESOURCES["memory"]),
                      extra_env, with_config)
    worker = _container(target, "ray-worker", worker_resources, extra_env, with_config)
    return {
        "rayVersion": ray_version(),
        "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", **(head_params or {})},
                          "template": _pod(target, head, with_config)},
        "workerGroupSpecs": [{"groupName": group, "replicas": replicas, "minReplicas": min_replicas,
                              "maxReplicas": max_replicas, "rayStartParams": {},
                              "template": _pod(target, worker, with_config)}],
    }


def entrypoint(target: ClusterTarget) -> str:
    """``mtl-ray run`` on the mounted config, writing to the target's storage and tracking server."""
    return shlex.join(["mtl-ray", "run", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}",
                       f"output_dir={target.storage}", f"mlflow.tracking_uri={target.tracking_uri}"])


def config_map(target: ClusterTarget, config_text: str) -> dict[str, Any]:
    """The ConfigMap that ships the run config to the pods."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{target.name}-config", "labels": {"app.kubernetes.io/name": "mtl-ray"}},
            "data": {CONFIG_FILE: config_text}}


def train_pods(cfg: RunConfig) -> int:
    """Worker pods of the RayJob: one per Ray Train worker of each concurrently running trial."""
    trials = cfg.tune.max_concurrent if cfg.tune is not None and cfg.tune.max_concurrent else 1
    return cfg.train.num_workers * trials


def ray_job(cfg: RunConfig, target: ClusterTarget) -> dict[str, Any]:
    """The RayJob: a cluster sized from ``train:``, ``mtl-ray run`` as its entrypoint, deleted after the job."""
    gpus = 1 if cfg.train.use_gpu is True else 0
    pods = train_pods(cfg)
    # + 1 CPU per pod: Ray Data tasks must run beside a worker that holds cpus_per_worker (else the fit hangs)
    worker = _resources(cfg.train.cpus_per_worker + 1, WORKER_MEMORY, gpus)
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": f"{target.name}-train", "labels": {"app.kubernetes.io/name": "mtl-ray"}},
        "spec": {
            "entrypoint": entrypoint(target),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "activeDeadlineSeconds": ACTIVE_DEADLINE_S,
            "backoffLimit": 0,
            "rayClusterSpec": _cluster(target, "train", worker, pods, pods, pods),
        },
    }


# ServeSpec fields that are Serve's cluster-wide http_options, not application arguments
HTTP_FIELDS = ("host", "port", "request_timeout_s")


def serve_config(cfg: RunConfig, tracking_uri: str, model: str | None = None) -> dict[str, Any]:
    """The Serve config (the schema of ``serve deploy``) of ``serve/serve_config.yaml``'s application
    with the config's ``serve:`` section, serving ``model`` (default: the config's champion,
    ``models:/<registered_model>@champion``)."""
    from serve.app import APP_NAME  # imports Ray Serve: only when manifests are written

    spec: ServeSpec = cfg.serve
    http: dict[str, Any] = {"host": "0.0.0.0", "port": SERVE_PORT}  # the pod's address, for KubeRay's Service
    if spec.request_timeout_s is not None:
        http["request_timeout_s"] = spec.request_timeout_s
    args_serve = {k: v for k, v in spec.model_dump(mode="json").items() if k not in HTTP_FIELDS}
    return {
        "proxy_location": "EveryNode",
        "http_options": http,
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "serve.app:app_builder",
            "runtime_env": {"env_vars": dict(SERVE_ENV)},
            "args": {"model": model or f"models:/{cfg.mlflow.registered_model}@champion",
                     "tracking_uri": tracking_uri, "serve": args_serve},
        }],
    }


def ray_service(cfg: RunConfig, target: ClusterTarget) -> dict[str, Any]:
    """The RayService: the Serve config above on a cluster that autoscales one pod per replica
    between ``serve.min_replicas`` and ``serve.max_replicas``; the token from a Secret."""
    spec = cfg.serve
    token = [{"name": spec.token_env,
              "valueFrom": {"secretKeyRef": {"name": target.token_secret, "key": TOKEN_KEY}}}]
    if spec.ingress == "haproxy":  # read by Ray's processes as they start: every pod's environment
        token += [{"name": k, "value": v} for k, v in HAPROXY_ENV.items()]
    worker = _resources(spec.num_cpus, SERVE_MEMORY, math.ceil(spec.num_gpus))
    initial = max(1, spec.min_replicas)
    cluster = _cluster(target, "serve", worker, initial, spec.min_replicas, spec.max_replicas,
                       head_params={"num-cpus": "0"}, extra_env=token, with_config=False)  # replicas on workers
    cluster["enableInTreeAutoscaling"] = True  # Serve's autoscaler adds and removes worker pods
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": f"{target.name}-serve", "labels": {"app.kubernetes.io/name": "mtl-ray"}},
        "spec": {
            "serveConfigV2": yaml.dump(serve_config(cfg, target.tracking_uri, target.model), Dumper=_Dumper,
                                       sort_keys=False),
            "rayClusterConfig": cluster,
        },
    }


def check_runnable(cfg: RunConfig) -> None:
    """The checks ``mtl-ray run`` and Serve make on start, made here: a job that cannot start
    should fail on the laptop, not after its cluster came up."""
    from pipelines.train import check_train_config
    from serve.app import deployment_options

    try:
        check_train_config(cfg)
        deployment_options(cfg.serve)
    except ValueError as err:
        raise ManifestError(str(err)) from None


class _Dumper(yaml.SafeDumper):
    """Plain YAML for kubectl: no anchors, multi-line strings (config, serveConfigV2) as ``|`` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]]) -> str:
    """Kubernetes documents as one multi-document YAML text."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120)


def shipped_config(path: str | Path, overrides: list[str] | None = None) -> str:
    """The config text the pods get: the file as written, or with ``overrides`` applied."""
    text = Path(path).read_text()
    if not overrides:
        return text
    return yaml.safe_dump(apply_overrides(yaml.safe_load(text) or {}, overrides), sort_keys=False)


def write_manifests(config: str | Path, out_dir: str | Path, overrides: list[str] | None = None,
                    image: str | None = None, storage: str | None = None, tracking_uri: str | None = None,
                    name: str | None = None, model: str | None = None) -> dict[str, Path]:
    """Write ``rayjob.yaml`` (ConfigMap + RayJob) and ``rayservice.yaml`` for a run config into
    ``out_dir``; returns their paths. Validates the config (with ``overrides``) first."""
    cfg = load_config(config, overrides)
    check_runnable(cfg)
    target = make_target(cfg, image, storage, tracking_uri, name, model)
    text = shipped_config(config, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"rayjob": out / "rayjob.yaml", "rayservice": out / "rayservice.yaml"}
    header = f"# Generated by `mtl-ray k8s --config {config}` from that config; regenerate, do not edit.\n"
    docs = {"rayjob": [config_map(target, text), ray_job(cfg, target)],
            "rayservice": [ray_service(cfg, target)]}
    for key, path in paths.items():
        path.write_text(header + dump(docs[key]))
    return paths
