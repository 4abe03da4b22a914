"""``mtl-ray k8s``: KubeRay manifests from a run config, checked with the strict CRD validator,
followed field by field when the config changes, refused when results would be lost, and the
RayService's own Serve config deployed to a local Ray the way KubeRay deploys it (Serve's REST API)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import roundtrip

from mtl.config import load_config
from pipelines.cli import main
from pipelines.k8s import CONFIG_DIR, CONFIG_FILE, TOKEN_KEY, write_manifests

REPO = Path(__file__).resolve().parents[2]
FULL = REPO / "configs" / "atis_sentiment_news.yaml"
VALIDATOR = REPO.parent / "shared" / "kuberay" / "validate.py"  # the project's shared checker, beside the repo
STORAGE = "s3://bucket/mtl-ray"
TRACKING = "https://mlflow.example.com"


def manifests(tmp_path: Path, *overrides: str, **flags) -> tuple[list[dict], list[dict]]:
    """(rayjob.yaml documents, rayservice.yaml documents) for the full config with ``overrides``."""
    flags = {"storage": STORAGE, "tracking_uri": TRACKING, **flags}
    paths = write_manifests(FULL, tmp_path / "k8s", list(overrides), **flags)
    return ([d for d in yaml.safe_load_all(paths["rayjob"].read_text())],
            [d for d in yaml.safe_load_all(paths["rayservice"].read_text())])


def of_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def serve_config_of(service: dict) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def containers(cluster: dict) -> list[dict]:
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for p in pods for c in p["spec"]["containers"]]


@pytest.mark.skipif(not VALIDATOR.is_file(), reason=f"the KubeRay CRD validator is not at {VALIDATOR}")
def test_manifests_pass_the_strict_kuberay_validator(tmp_path):
    manifests(tmp_path)
    files = sorted((tmp_path / "k8s").glob("*.yaml"))
    # this interpreter has Ray, so the validator also checks serveConfigV2 with Serve's own schema
    proc = subprocess.run([sys.executable, str(VALIDATOR), *map(str, files)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RayJob atis-sentiment-news-train valid" in proc.stdout
    assert "RayService atis-sentiment-news-serve valid" in proc.stdout
    assert "2 KubeRay document(s) checked, 0 error(s)" in proc.stdout
    # the Serve schema check is live under this interpreter (without Ray, the validator skips it)
    bad = tmp_path / "bad.yaml"
    bad.write_text((tmp_path / "k8s" / "rayservice.yaml").read_text().replace(
        "proxy_location: EveryNode", "proxy_location: Sometimes"))
    proc = subprocess.run([sys.executable, str(VALIDATOR), str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "serveConfigV2" in proc.stdout and "proxy_location" in proc.stdout, proc.stdout


def test_job_runs_the_shipped_config_into_storage_and_the_tracking_server(tmp_path):
    job_docs, _ = manifests(tmp_path)
    job, cmap = of_kind(job_docs, "RayJob"), of_kind(job_docs, "ConfigMap")
    spec = job["spec"]
    assert spec["entrypoint"] == (f"mtl-ray run --config {CONFIG_DIR}/{CONFIG_FILE} output_dir={STORAGE} "
                                  f"mlflow.tracking_uri={TRACKING}")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert cmap["data"][CONFIG_FILE] == FULL.read_text()  # the file itself, comments and all
    for c in containers(spec["rayClusterSpec"]):
        assert {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True} in c["volumeMounts"]
        assert c["image"] == "mtl-ray:0.1.0-cpu"
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert {"name": "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "value": "1"} in c["env"]  # never the laptop's loopback


def test_num_workers_sizes_the_job_and_travels_in_the_config(tmp_path):
    job = of_kind(manifests(tmp_path, "train.num_workers=4")[0], "RayJob")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 4, 4)
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"] == {"cpu": "3", "memory": "8Gi"}  # cpus_per_worker 2 + 1 for Ray Data
    shipped = of_kind(manifests(tmp_path, "train.num_workers=4")[0], "ConfigMap")["data"][CONFIG_FILE]
    assert yaml.safe_load(shipped)["train"]["num_workers"] == 4

    concurrent = of_kind(manifests(tmp_path, "train.num_workers=2", "tune.max_concurrent=3",
                                   "train.cpus_per_worker=0.5")[0], "RayJob")
    (group,) = concurrent["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 6  # 2 workers x 3 concurrent trials
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "2"  # 0.5 + 1, whole CPUs


def test_gpu_training_and_serving_ask_kubernetes_for_gpus(tmp_path):
    job_docs, service_docs = manifests(tmp_path, "train.use_gpu=true", "serve.num_gpus=0.5")
    job, service = of_kind(job_docs, "RayJob"), of_kind(service_docs, "RayService")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert group["template"]["spec"]["containers"][0]["image"] == "mtl-ray:0.1.0-gpu"
    (serving,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert serving["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert serve_config_of(service)["applications"][0]["args"]["serve"]["num_gpus"] == 0.5
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_max_replicas_sizes_the_service_and_its_serve_config(tmp_path):
    _, service_docs = manifests(tmp_path, "serve.max_replicas=5", "serve.min_replicas=2")
    service = of_kind(service_docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 5)
    assert cluster["enableInTreeAutoscaling"] is True
    args = serve_config_of(service)["applications"][0]["args"]
    assert (args["serve"]["min_replicas"], args["serve"]["max_replicas"]) == (2, 5)


def test_serve_config_is_the_serve_command_application_for_the_champion(tmp_path):
    from serve.app import builder_settings

    cfg = load_config(FULL)
    service = of_kind(manifests(tmp_path)[1], "RayService")
    config = serve_config_of(service)
    local = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    (app,), (local_app,) = config["applications"], local["applications"]
    for key in ("name", "route_prefix", "import_path", "runtime_env"):
        assert app[key] == local_app[key], key
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 30.0}
    # what app_builder makes of these args is exactly the config's serve: section and champion
    model, tracking_uri, spec = builder_settings(app["args"])
    assert (model, tracking_uri) == (f"models:/{cfg.mlflow.registered_model}@champion", TRACKING)
    assert spec.model_dump(exclude={"host", "port"}) == cfg.serve.model_dump(exclude={"host", "port"})


def test_bearer_token_comes_from_a_secret_not_the_manifest(tmp_path):
    service = of_kind(manifests(tmp_path, "serve.token_env=API_TOKEN")[1], "RayService")
    ref = {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "atis-sentiment-news-token", "key": TOKEN_KEY}}}
    for c in containers(service["spec"]["rayClusterConfig"]):
        assert ref in c["env"]
    app = serve_config_of(service)["applications"][0]
    assert "API_TOKEN" not in app["runtime_env"]["env_vars"]
    assert app["args"]["serve"]["token_env"] == "API_TOKEN"


@pytest.mark.parametrize("ingress, expected", [
    ("haproxy", {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                 "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}),
    ("proxy", {}),
])
def test_serve_ingress_mode_is_in_every_pods_environment(tmp_path, ingress, expected):
    """Ray's processes read the ingress mode as they start, so it must be in the pods' environment
    (a runtime_env would come too late for the proxy and controller)."""
    service = of_kind(manifests(tmp_path, f"serve.ingress={ingress}")[1], "RayService")
    for c in containers(service["spec"]["rayClusterConfig"]):
        got = {e["name"]: e["value"] for e in c["env"] if e["name"].startswith("RAY_SERVE_")}
        assert got == expected
    assert serve_config_of(service)["applications"][0]["args"]["serve"]["ingress"] == ingress


@pytest.mark.parametrize("flags, named", [
    (["--tracking-uri", TRACKING], "--storage"),  # the config's output_dir: runs
    (["--storage", "/mnt/results", "--tracking-uri", TRACKING], "--storage"),
    (["--storage", STORAGE], "--tracking-uri"),  # the config's sqlite:///mlflow.db
    (["--storage", STORAGE, "--tracking-uri", "file:///tmp/mlruns"], "--tracking-uri"),
    (["--storage", STORAGE, "--tracking-uri", TRACKING, "mlflow.enabled=false"], "mlflow.enabled"),
    (["--storage", STORAGE, "--tracking-uri", TRACKING, "--model", "runs/x/model"], "--model"),
    # what the job or the Serve app would refuse on start, refused before any cluster exists
    # (the config gate refuses this one as it loads, naming the file and the field)
    (["--storage", STORAGE, "--tracking-uri", TRACKING, "train.num_workers=3"], f"{FULL}: train.batch_size: 32 "),
    (["--storage", STORAGE, "--tracking-uri", TRACKING, "serve.min_replicas=3"], "serve.min_replicas (3)"),
])
def test_refuses_manifests_that_would_lose_results(tmp_path, capsys, flags, named):
    out = tmp_path / "k8s"
    assert main(["k8s", "--config", str(FULL), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtl-ray: error: {named}"), err
    assert not out.exists()


def test_cli_writes_both_manifests(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert main(["k8s", "--config", str(FULL), "--out", str(out), "--storage", "gs://b/p/",
                 "--tracking-uri", "databricks", "--image", "reg.example.com/mtl-ray:1", "--name", "Demo_Run"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "rayjob.yaml"), str(out / "rayservice.yaml")]
    job = of_kind(list(yaml.safe_load_all((out / "rayjob.yaml").read_text())), "RayJob")
    assert job["metadata"]["name"] == "demo-run-train"
    assert "output_dir=gs://b/p mlflow.tracking_uri=databricks" in job["spec"]["entrypoint"]
    assert {c["image"] for c in containers(job["spec"]["rayClusterSpec"])} == {"reg.example.com/mtl-ray:1"}


def test_a_pinned_model_version_changes_only_the_serve_config(tmp_path):
    default = of_kind(manifests(tmp_path)[1], "RayService")
    pinned = of_kind(manifests(tmp_path, model="models:/mtl-ray-atis-sentiment-news/7")[1], "RayService")
    assert serve_config_of(pinned)["applications"][0]["args"]["model"] == "models:/mtl-ray-atis-sentiment-news/7"
    assert pinned["spec"]["rayClusterConfig"] == default["spec"]["rayClusterConfig"]  # KubeRay updates in place


def test_dockerfile_matches_the_makefile_and_copies_what_exists():
    docker = (REPO / "deploy" / "Dockerfile").read_text()
    make = (REPO / "Makefile").read_text()
    data = re.search(r"^DATA_PACKAGES := (.+)$", make, re.M).group(1).split()
    torch = re.search(r"^TORCH\s+\?= (\S+)$", make, re.M).group(1)
    assert re.search(r"^ARG DATA_PACKAGES=\"(.+)\"$", docker, re.M).group(1).split() == data
    assert f"ARG TORCH={torch}" in docker
    from importlib import metadata

    assert f"ARG RAY_VERSION={metadata.version('ray')}" in docker
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", docker, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), src


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEXTS = ["fly from boston to denver tomorrow", "a gripping, beautifully acted film",
         "shares in the bank fell after the results"]


@pytest.mark.slow
def test_service_serve_config_deploys_like_kuberay_and_serves_the_predictor(tmp_path, ray_session, tiny_artifact):
    """serveConfigV2 from the generated RayService, PUT to the dashboard's Serve REST API (what
    KubeRay and `serve deploy` do) on a local Ray: the tiny model answers over HTTP with the
    in-process predictor's answers, behind the bearer token."""
    from ray import serve
    from ray._private.worker import get_dashboard_url
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeDeploySchema

    from mtl.predictor import Predictor

    config = serve_config_of(of_kind(manifests(tmp_path, "serve.max_replicas=1", "serve.num_cpus=0.5")[1],
                                     "RayService"))
    # What Kubernetes supplies in a pod, supplied locally: a free loopback port instead of the pod's
    # 0.0.0.0:8000, the tiny model instead of the registry's champion (a directory needs no tracking
    # server), and the token the Secret puts in the replicas' environment.
    port, token = free_port(), "k8s-test-token"
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"]["model"] = str(tiny_artifact)
    app["runtime_env"]["env_vars"][app["args"]["serve"]["token_env"]] = token
    serve.shutdown()  # Serve takes its http_options from the first deploy
    ServeSubmissionClient(f"http://{get_dashboard_url()}").deploy_applications(
        ServeDeploySchema.model_validate(config).model_dump(exclude_unset=True))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.time() + 90
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.time() < deadline, serve.status()
                time.sleep(1)
            assert client.post("/v1/predict", json={"texts": TEXTS}).status_code == 401
            r = client.post("/v1/predict", json={"texts": TEXTS}, headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == str(tiny_artifact)
            expected = Predictor.load(tiny_artifact).predict(TEXTS)
            assert r.json()["predictions"] == roundtrip(expected)
    finally:
        serve.shutdown()
