"""The FastAPI app and the batch logic of serve/app.py, in process (no Ray): the same ``make_api`` the
replicas build, around the tiny artifact's Predictor."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hostile import HOSTILE, HOSTILE_SPEC, REFUSED, check_hostile_answer, docs_assets

from mtl.config import ServeSpec
from serve.app import PredictItem, answer_or_raise, make_api, run_batch
from serve.schema import RequestError

TOKEN = "s3cret-token"
SPEC = ServeSpec(max_texts=4, max_chars=100, max_body_bytes=2048)


class LocalService:
    """What the replica offers make_api, without Serve's batching."""

    model_name = "tiny"
    model_version = None

    def __init__(self, predictor):
        self.predictor = predictor
        self.task_names = predictor.task_names

    def describe(self):
        return self.predictor.describe()

    async def predict(self, texts, tasks, top_k):
        return answer_or_raise(run_batch(self.predictor, [PredictItem(texts, tasks, top_k)], 64)[0]), None


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


def test_app_builder_binds_the_configs_deployment_without_ray(tiny_artifact, tmp_path, monkeypatch):
    """What ``serve run serve.app:app_builder`` deploys: the config's serve section, overridden by
    top-level args, becomes the deployment's options and the replica's constructor arguments."""
    import yaml

    from serve.app import DEPLOYMENT_NAME, app_builder

    monkeypatch.delenv("MTL_RAY_TOKEN", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "tasks": [{"name": "t", "kind": "sequence_classification", "source": {"type": "bbc"}}],
        "mlflow": {"tracking_uri": "sqlite:///from-config.db"},
        "serve": {"max_replicas": 3, "num_cpus": 0.5, "target_ongoing_requests": 4, "max_ongoing_requests": 16,
                  "max_batch_tokens": 256, "max_texts": 5},
    }))
    app = app_builder({"model": str(tiny_artifact), "config": str(config), "min_replicas": 0, "max_texts": 6})
    # Serve keeps the bound deployment on the application (no public accessor in Ray 2.x)
    d = app._bound_deployment
    assert d.name == DEPLOYMENT_NAME
    assert d.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert d.max_ongoing_requests == 16
    assert d.logging_config["enable_access_log"] is False
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas, auto.target_ongoing_requests) == (0, 1, 3, 4)
    model, model_dir, spec, tracking_uri, version = d.init_args
    assert (model, model_dir, tracking_uri, version) == (str(tiny_artifact), str(tiny_artifact),
                                                          "sqlite:///from-config.db", None)
    assert spec == ServeSpec(max_replicas=3, num_cpus=0.5, target_ongoing_requests=4, max_ongoing_requests=16,
                             max_batch_tokens=256, max_texts=6, min_replicas=0).model_dump(mode="json")
    with pytest.raises(FileNotFoundError):
        app_builder({"model": str(tiny_artifact / "nope")})


def test_a_bad_text_fails_only_its_own_request_in_a_batch(tiny_artifact, predictor, poisoned_model):
    """One request's text breaks the batched pass: only that request fails (422 naming its own
    text index); every other request of the batch gets the answer it gets alone."""
    from mtl.predictor import Predictor
    from serve.app import ItemFailure

    p = Predictor.load(tiny_artifact, device="cpu")
    p.model = poisoned_model(p.model, p.tokenizer.convert_tokens_to_ids("denver"))
    items = [
        PredictItem(["fly from boston to dallas", "cheap flights"], ["slots"], 1),
        PredictItem(["what a dull film", "to denver please", "hello"], ["sentiment", "intent"], 1),
        PredictItem(["stocks fell sharply today"], ["topic"], 3),
        PredictItem(["a fine day"], ["intent"], 1),
    ]
    got = run_batch(p, items, 64)
    assert isinstance(got[1], ItemFailure) and got[1].status == 422
    assert got[1].message.startswith("texts[1] ") and "IndexError" in got[1].message and "denver" not in got[1].message
    for i in (0, 2, 3):
        alone = predictor.predict(items[i].texts, items[i].tasks, items[i].top_k)
        assert _close(got[i], alone), (got[i], alone)
    with pytest.raises(RequestError) as err:
        answer_or_raise(got[1])
    assert err.value.status == 422


class _FlakyPredictor:
    """Pure logic: the union pass fails whenever two requests' texts share it; ``broken`` fails all."""

    task_names = ["intent"]

    def __init__(self, broken: bool = False):
        self.broken = broken

    def predict(self, texts, tasks, top_k, errors="raise"):
        if self.broken or len(texts) > 1:
            raise RuntimeError("device lost")
        return [{"intent": {"label": texts[0]}}]


def test_a_batch_that_fails_outside_the_predictor_is_retried_per_request():
    from serve.app import ItemFailure

    items = [PredictItem(["a"], ["intent"], 1), PredictItem(["b"], ["intent"], 1)]
    assert run_batch(_FlakyPredictor(), items, 64) == [[{"intent": {"label": "a"}}], [{"intent": {"label": "b"}}]]
    assert run_batch(_FlakyPredictor(broken=True), items, 64) == [
        ItemFailure(500, "internal error: the model failed on this request")] * 2


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_texts_get_an_answer_or_a_4xx(predictor, name):
    text = HOSTILE[name]
    with TestClient(make_api(LocalService(predictor), HOSTILE_SPEC)) as client:
        r = client.post("/v1/predict", content=json.dumps({"texts": [text]}),
                        headers={"content-type": "application/json"})
        check_hostile_answer(text, r.status_code, r.json())
        assert r.status_code == (422 if name in REFUSED else 200), r.text
        assert client.post("/v1/predict", json={"texts": ["fly to boston"]}).status_code == 200


def test_docs_page_loads_its_assets_from_the_app(open_client):
    """/docs works air-gapped: no CDN, every script and stylesheet it references is served here."""
    r = open_client.get("/docs")
    assert r.status_code == 200
    assets = docs_assets(r.text)
    assert len(assets) >= 3 and not [a for a in assets if "://" in a or a.startswith("//")], assets
    for url in assets:
        got = open_client.get(url)
        assert got.status_code == 200 and len(got.content) > 1000, url
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    assert open_client.get("/openapi.json").json()["info"]["title"] == "mtl-ray"


def test_token_budget_costs():
    from serve.app import batch_cost, estimated_tokens

    assert estimated_tokens(["fly to boston"], 48) == 2 + 4  # 3 words * 1.3, rounded up, + CLS/SEP
    assert estimated_tokens(["word " * 500], 48) == 48  # capped at the model's length
    assert estimated_tokens(["a b", "c d e f"], 48) == (2 + 3) + (2 + 6)
    items = [PredictItem(["a"], ["intent"], 1, cost=7), PredictItem(["b"], ["intent"], 1, cost=5)]
    assert batch_cost(items) == 12
    assert batch_cost([PredictItem(["a"], ["intent"])] * 3) == 3  # without a budget: requests
