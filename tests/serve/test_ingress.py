"""``serve.ingress: haproxy`` (the default of ``mtl-ray serve``): HAProxy in front of replicas that
answer HTTP themselves, on a Ray of its own in a subprocess. The same answers as the in-process
predictor, and the same refusals as through Serve's Python proxy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hostile import roundtrip

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "haproxy-token-7"
AUTH = {"authorization": f"Bearer {TOKEN}"}
TEXTS = ["fly from boston to denver", "a gripping, beautifully acted film", "shares in the bank fell"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def haproxy_url(tiny_artifact):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RAY_ADDRESS",):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/serve/haproxy_server.py"), str(tiny_artifact),
                             str(_free_port()), TOKEN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("READY "):
            break
    else:
        proc.wait(timeout=60)
        pytest.fail("the HAProxy server did not start:\n" + "".join(lines[-60:]))
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    assert fields["haproxy"] == "haproxy", line  # HAProxy holds the port, not Serve's Python proxy
    yield line.split()[1]
    proc.stdin.close()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(haproxy_url):
    with httpx.Client(base_url=haproxy_url, timeout=60) as c:
        yield c


def test_answers_equal_the_in_process_predictor(client, tiny_artifact):
    from mtl.predictor import Predictor

    r = client.post("/v1/predict", json={"texts": TEXTS}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = Predictor.load(tiny_artifact).predict(TEXTS)
    assert body["predictions"] == roundtrip(expected)
    assert r.headers["x-request-id"]  # Serve's request id, as through the Python proxy


@pytest.mark.parametrize("content, headers, status, needle", [
    (b"{bad json", AUTH, 400, "malformed JSON"),
    (json.dumps({"texts": ["hi"], "tasks": ["nope"]}).encode(), AUTH, 422, "unknown task"),
    (json.dumps({"texts": ["x" * 5000]}).encode(), AUTH, 413, "larger than 4096 bytes"),
    (json.dumps({"texts": ["hello \ud800 world"]}).encode(), AUTH, 422, "lone surrogate"),
    (json.dumps({"texts": ["hi"]}).encode(), {}, 401, "token"),
])
def test_refusals_are_the_apps_and_it_keeps_serving(client, content, headers, status, needle):
    r = client.post("/v1/predict", content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text
    assert needle.lower() in r.text.lower()
    assert client.post("/v1/predict", json={"texts": ["fly to boston"]}, headers=AUTH).status_code == 200


def test_open_routes(client):
    assert client.get("/healthz").status_code == 200
    tasks = client.get("/v1/tasks", headers=AUTH).json()
    assert [t["name"] for t in tasks["tasks"]] == ["intent", "slots", "sentiment", "topic"]
