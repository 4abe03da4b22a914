"""The FastAPI app and the batch logic of serve/app.py, in process (no Ray): the same ``make_api`` the
replicas build, around the tiny artifact's Predictor."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from mtl.config import ServeSpec
from serve.app import PredictItem, make_api, run_batch

TOKEN = "s3cret-token"
SPEC = ServeSpec(max_texts=4, max_chars=100, max_body_bytes=2048)


class LocalService:
    """What the replica offers make_api, without Serve's batching."""

    model_name = "tiny"

    def __init__(self, predictor):
        self.predictor = predictor
        self.task_names = predictor.task_names

    def describe(self):
        return self.predictor.describe()

    async def predict(self, texts, tasks, top_k):
        return run_batch(self.predictor, [PredictItem(texts, tasks, top_k)], 64)[0]


@pytest.fixture(scope="module")
def predictor(tiny_artifact):
    from mtl.predictor import Predictor

    return Predictor.load(tiny_artifact, device="cpu")


@pytest.fixture(scope="module")
def open_client(predictor):
    with TestClient(make_api(LocalService(predictor), SPEC)) as client:
        yield client


@pytest.fixture(scope="module")
def token_client(predictor):
    with TestClient(make_api(LocalService(predictor), SPEC, token=TOKEN)) as client:
        yield client


def _close(a, b, tol=1e-5):
    """Same structure and strings; floats within ``tol``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and abs(a - b) <= tol
    return a == b


def test_run_batch_unions_tasks_and_splits_answers(predictor):
    items = [
        PredictItem(["fly from boston to denver", "cheap flights"], ["slots"], 1),
        PredictItem(["what a dull film"], ["sentiment", "intent"], 1),
        PredictItem(["stocks fell sharply today"], ["topic"], 3),
        PredictItem(["to denver please"], ["intent"], 1),
    ]
    for chunk in (64, 2):  # one pass per top_k, or split into passes of 2 texts
        got = run_batch(predictor, items, chunk)
        assert [len(g) for g in got] == [2, 1, 1, 1]
        for item, answers in zip(items, got):
            alone = predictor.predict(item.texts, item.tasks, item.top_k)
            for a, b in zip(answers, alone):
                assert list(a) == item.tasks
                # padding to a longer text of the same batch may move the last float digits
                assert _close(a, b), (a, b)
    assert "top_k" in got[2][0]["topic"] and "top_k" not in got[1][0]["intent"]


def test_open_server_answers_like_the_predictor(open_client, predictor):
    texts = ["  fly from  boston to denver ", "a wonderful, moving film"]
    r = open_client.post("/v1/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny"
    assert body["predictions"] == json.loads(json.dumps(predictor.predict(texts)))
    assert open_client.get("/v1/tasks").json()["tasks"] == predictor.describe()
    assert open_client.get("/healthz").json() == {"status": "ok"}
    assert open_client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("content,headers,status", [
    (b'{"texts": ["a"', {"content-type": "application/json"}, 400),
    (b"not json", {"content-type": "application/json"}, 400),
    (b'{"texts": ["a"]}', {"content-type": "text/plain"}, 422),
    (b'["a"]', {"content-type": "application/json"}, 422),
])
def test_malformed_bodies(open_client, content, headers, status):
    r = open_client.post("/v1/predict", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert "detail" in r.json()


def test_body_limit_by_header_and_by_bytes(open_client):
    big = json.dumps({"texts": ["x" * 50] * 60}).encode()
    assert len(big) > SPEC.max_body_bytes
    r = open_client.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "2048 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for _ in range(10):
            yield b" " * 300

    r = open_client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    small = json.dumps({"texts": ["ok"]}).encode()
    r = open_client.post("/v1/predict", content=small,
                         headers={"content-type": "application/json", "content-length": "999999"})
    assert r.status_code == 413
    assert open_client.post("/v1/predict", json={"texts": ["ok"]}).status_code == 200


def test_token(token_client):
    good = {"authorization": f"Bearer {TOKEN}"}
    assert token_client.post("/v1/predict", json={"texts": ["hi"]}).status_code == 401
    r = token_client.post("/v1/predict", json={"texts": ["hi"]}, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert token_client.get("/v1/tasks", headers={"authorization": TOKEN}).status_code == 401
    # the token is checked before the body is parsed
    assert token_client.post("/v1/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 401
    assert token_client.get("/healthz").status_code == 200
    assert token_client.post("/v1/predict", json={"texts": ["hi"]}, headers=good).status_code == 200
    assert token_client.get("/v1/tasks", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200


def test_builder_settings(monkeypatch):
    from serve.app import builder_settings

    monkeypatch.delenv("MTL_RAY_MODEL", raising=False)
    model, uri, spec = builder_settings({"model": "models:/m@champion", "tracking_uri": "sqlite:///x.db",
                                         "serve": {"max_texts": 3, "max_batch_size": 4}, "max_batch_size": "16"})
    assert (model, uri, spec.max_texts, spec.max_batch_size) == ("models:/m@champion", "sqlite:///x.db", 3, 16)
    with pytest.raises(ValueError, match="unknown argument"):
        builder_settings({"model": "x", "batch": 1})
    with pytest.raises(ValueError, match="model is required"):
        builder_settings({})
    monkeypatch.setenv("MTL_RAY_MODEL", "runs/x/model")
    assert builder_settings({})[0] == "runs/x/model"


def test_app_builder_binds_without_ray(tiny_artifact):
    from ray.serve import Application

    from serve.app import app_builder

    assert isinstance(app_builder({"model": str(tiny_artifact), "max_replicas": 1}), Application)
    with pytest.raises(FileNotFoundError):
        app_builder({"model": str(tiny_artifact / "nope")})
