"""Real Ray Serve on loopback: one deployment of the tiny artifact (with a bearer token, set in the
replica's environment through the deployment's runtime_env) serves every test of this module."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from hostile import HOSTILE, HOSTILE_SPEC, REFUSED, check_hostile_answer, docs_assets, roundtrip

from mtl.config import ServeSpec

pytestmark = pytest.mark.slow

TOKEN = "test-token-123"
AUTH = {"authorization": f"Bearer {TOKEN}"}
# the main app batches by tokens (max_batch_tokens); the alias-following app by requests
SPEC = ServeSpec(max_texts=8, max_chars=200, max_body_bytes=4096, min_replicas=1, max_replicas=1,
                 num_cpus=0.5, max_batch_size=8, max_batch_tokens=400, batch_wait_timeout_s=0.005)
TEXTS = [
    "  fly from  boston to denver ",
    "show me\tthe cheapest flights to new york on monday morning",
    "a gripping, beautifully acted film",
    "shares in the bank fell after the results",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(ray_session, tiny_artifact):
    from ray import serve

    from serve.app import APP_NAME, build_app, http_options

    port = free_port()
    serve.start(http_options=http_options(SPEC.model_copy(update={"port": port})))
    app = build_app(str(tiny_artifact), SPEC, model_name="tiny-test", env={SPEC.token_env: TOKEN})
    serve.run(app, name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def predictor(tiny_artifact):
    from mtl.predictor import Predictor

    return Predictor.load(tiny_artifact)


def test_all_tasks_equal_the_in_process_predictor(client, predictor):
    r = client.post("/v1/predict", json={"texts": TEXTS}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-test"
    # One request alone in its batch: the replica runs the same Predictor.predict on the same texts
    # (same length buckets, same padding), so the answers are the in-process ones.
    assert body["predictions"] == roundtrip(predictor.predict(TEXTS))
    assert set(body["predictions"][0]) == {"intent", "slots", "sentiment", "topic"}


def test_subset_of_tasks_and_top_k(client, predictor):
    r = client.post("/v1/predict", json={"texts": TEXTS[:2], "tasks": ["slots", "intent"], "top_k": 3},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [set(p) for p in preds] == [{"slots", "intent"}] * 2
    assert preds == roundtrip(predictor.predict(TEXTS[:2], ["slots", "intent"], top_k=3))
    assert len(preds[0]["intent"]["top_k"]) == 3


def test_entity_spans_slice_the_original_text(client):
    texts = ["  fly from  boston to denver ", "x\t\ty  z   ", "newyork\u00a0to  la"]
    r = client.post("/v1/predict", json={"texts": texts, "tasks": ["slots"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    seen = 0
    for text, pred in zip(texts, r.json()["predictions"]):
        for ent in pred["slots"]["entities"]:
            assert text[ent["start"]:ent["end"]] == ent["text"]
            assert ent["text"] == ent["text"].strip() and ent["type"]
            seen += 1
    assert seen > 0  # an untrained model tags something; the check above ran


def test_tasks_endpoint_matches_the_manifest(client, tiny_artifact):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    r = client.get("/v1/tasks", headers=AUTH)
    assert r.status_code == 200
    got = r.json()
    assert got["model"] == "tiny-test"
    assert got["tasks"] == [{"name": t["name"], "kind": t["kind"], "labels": t["labels"]}
                            for t in manifest["tasks"]]


JSON = {"content-type": "application/json"}
BAD = [
    ("malformed json", b'{"texts": ["a",', 400, None),
    ("not an object", b'["a"]', 422, None),
    ("texts missing", {}, 422, "texts"),
    ("texts a string", {"texts": "a flight"}, 422, "texts"),
    ("texts not strings", {"texts": [1, 2]}, 422, "texts"),
    ("top_k a string", {"texts": ["a"], "top_k": "many"}, 422, "top_k"),
    ("top_k zero", {"texts": ["a"], "top_k": 0}, 422, "top_k"),
    ("unknown task", {"texts": ["a"], "tasks": ["intent", "weather"]}, 422, "weather"),
    ("empty texts", {"texts": []}, 422, "texts"),
    ("too many texts", {"texts": ["a"] * 9}, 413, "limit is 8"),
    ("text too long", {"texts": ["a", "b" * 201]}, 413, "200 characters"),
    ("empty text", {"texts": [""]}, 422, "blank"),
    ("blank text", {"texts": ["ok", " \t\n "]}, 422, "blank"),
    ("body too large", {"texts": ["word " * 39] * 8, "pad": "x" * 3000}, 413, "4096 bytes"),
]


@pytest.mark.parametrize("name,body,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(client, name, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/predict", content=content, headers={**JSON, **AUTH})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if needle:
        assert needle in json.dumps(detail)
    if name == "unknown task":
        assert all(t in detail for t in ("intent", "slots", "sentiment", "topic"))
    assert client.get("/healthz").status_code == 200
    ok = client.post("/v1/predict", json={"texts": ["book a flight"], "tasks": ["intent"]}, headers=AUTH)
    assert ok.status_code == 200 and set(ok.json()["predictions"][0]) == {"intent"}


def test_body_too_large_without_content_length(client):
    def chunks():  # chunked transfer: the replica counts the bytes as they arrive
        yield b'{"texts": ["'
        for _ in range(20):
            yield b"y" * 400
        yield b'"]}'

    r = client.post("/v1/predict", content=chunks(), headers={**JSON, **AUTH})
    assert r.status_code == 413, r.text
    assert client.get("/healthz").status_code == 200


def test_token_guards_v1_only(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.post("/v1/predict", json={"texts": ["hi"]}).status_code == 401
    r = client.get("/v1/tasks", headers={"authorization": "Bearer nope"})
    assert r.status_code == 401 and "token" in r.json()["detail"]
    assert client.get("/v1/tasks", headers=AUTH).status_code == 200
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/predict", "/v1/tasks", "/healthz"}
    assert client.get("/docs").status_code == 200


def test_concurrent_requests_are_batched_and_answered_each(base_url, predictor):
    """Many requests at once land in shared batches; each gets its own texts' and tasks' answers."""
    import asyncio

    from ray import serve

    from serve.app import APP_NAME

    handle = serve.get_app_handle(APP_NAME)
    before = handle.stats.remote().result(timeout_s=30)
    tasks_for = [["intent"], ["slots"], ["sentiment", "topic"], None]

    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
            reqs = []
            for i in range(24):
                body = {"texts": [TEXTS[i % 4], f"request number {i}"]}
                if tasks_for[i % 4]:
                    body["tasks"] = tasks_for[i % 4]
                reqs.append((body, c.post("/v1/predict", json=body, headers=AUTH)))
            return [(b, await r) for b, r in [(b, asyncio.ensure_future(f)) for b, f in reqs]]

    for body, r in asyncio.run(run()):
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        want = predictor.predict(body["texts"], body.get("tasks"))
        assert [list(p) for p in got] == [list(p) for p in want]
        # Batched with other requests the texts are padded to the batch's longest, which can move
        # the last float digits; labels and entity spans must not change.
        for g, w in zip(got, want):
            for task, answer in w.items():
                if "label" in answer:
                    assert g[task]["label"] == answer["label"]
                    assert abs(g[task]["score"] - answer["score"]) < 1e-5
                if "entities" in answer:
                    assert [(e["type"], e["start"], e["end"]) for e in g[task]["entities"]] == \
                           [(e["type"], e["start"], e["end"]) for e in answer["entities"]]
    after = handle.stats.remote().result(timeout_s=30)  # one replica: every request went through it
    assert after["requests"] - before["requests"] == 24
    assert after["texts"] - before["texts"] == 48
    assert after["batches"] - before["batches"] < 24 and after["max_batch"] > 1  # batches formed
    assert after["max_batch_cost"] <= 400  # by tokens: no batch over the budget


def _same_answers(got: list[dict], want: list[dict]) -> None:
    """Labels, tags and spans equal; scores within 1e-5 (padding in a shared batch moves last digits)."""
    assert [list(p) for p in got] == [list(p) for p in want]
    for g, w in zip(got, want):
        for task, answer in w.items():
            if "label" in answer:
                assert g[task]["label"] == answer["label"] and abs(g[task]["score"] - answer["score"]) < 1e-5
            if "entities" in answer:
                assert g[task]["tags"] == answer["tags"]
                assert [(e["type"], e["start"], e["end"]) for e in g[task]["entities"]] == \
                       [(e["type"], e["start"], e["end"]) for e in answer["entities"]]


def test_poisoned_batches_fail_no_good_request(base_url, predictor):
    """The attack from issue 11: one lone-surrogate body among 23 concurrent good requests, ten
    rounds. Before the fix 128 of 230 good requests failed with a 500; now every good one is a 200
    with the answer it gets alone, and each bad one a 422 naming its text."""
    import asyncio

    bad_body = b'{"texts": ["fine text", "hello \\ud800 world"]}'

    async def round_(c: httpx.AsyncClient, r: int):
        bodies = [{"texts": [TEXTS[(r + i) % 4], f"good request {i}"]} for i in range(23)]
        futures = [c.post("/v1/predict", json=b, headers=AUTH) for b in bodies[:11]]
        futures.append(c.post("/v1/predict", content=bad_body, headers={**JSON, **AUTH}))
        futures += [c.post("/v1/predict", json=b, headers=AUTH) for b in bodies[11:]]
        answers = await asyncio.gather(*futures)
        return bodies, answers[:11] + answers[12:], answers[11]

    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
            return [await round_(c, r) for r in range(10)]

    failed_good = 0
    for bodies, good, bad in asyncio.run(run()):
        assert bad.status_code == 422 and "texts[1]" in json.dumps(bad.json()["detail"]), bad.text
        for body, r in zip(bodies, good):
            if r.status_code != 200:
                failed_good += 1
                continue
            _same_answers(r.json()["predictions"], predictor.predict(body["texts"]))
    assert failed_good == 0


def test_a_text_that_breaks_the_pass_fails_only_its_request_in_serves_batch(base_url, predictor):
    """Past the HTTP schema (a deployment handle calls the replica's batched ``predict`` directly), a
    text the tokenizer raises on shares Serve's batches with good requests: only its request fails
    (RequestError 422 naming its index, as the predictor refuses it), every other gets its answer;
    the replica's counters show the batches formed and the failures. (A text that passes every
    check and still breaks the pass is bisected out: tests/serve/test_api.py, tests/mtl/test_predictor.py.)"""
    from ray import serve

    from serve.app import APP_NAME
    from serve.schema import RequestError

    handle = serve.get_app_handle(APP_NAME)
    before = handle.stats.remote().result(timeout_s=30)
    for _ in range(3):
        calls = [(i, [TEXTS[i % 4], f"request {i}"]) for i in range(16)]
        calls.insert(7, (-1, ["fine", "bad \udfff text"]))
        responses = [(i, texts, handle.predict.remote(texts, ["intent", "slots"], 1)) for i, texts in calls]
        for i, texts, resp in responses:
            if i == -1:
                with pytest.raises(RequestError) as err:
                    resp.result(timeout_s=60)
                assert err.value.status == 422 and err.value.message.startswith("texts[1] contains a lone surrogate")
            else:
                answers, _version = resp.result(timeout_s=60)
                _same_answers(answers, predictor.predict(texts, ["intent", "slots"]))
    after = handle.stats.remote().result(timeout_s=30)
    assert after["failed"] - before["failed"] == 3
    assert after["requests"] - before["requests"] == 51
    assert after["batches"] - before["batches"] < 51  # requests shared batches
    assert after["max_batch"] > 1


@pytest.fixture(scope="module")
def hostile_url(base_url, tiny_artifact):
    """A second application on the same Serve instance, with limits wide enough for the corpus."""
    from ray import serve

    from serve.app import build_app

    app = build_app(str(tiny_artifact), HOSTILE_SPEC.model_copy(update={"min_replicas": 1, "max_replicas": 1,
                                                                        "num_cpus": 0.5}),
                    model_name="tiny-hostile")
    serve.run(app, name="hostile", route_prefix="/hostile")
    yield f"{base_url}/hostile"
    serve.delete("hostile")


def test_hostile_texts_over_http_get_an_answer_or_a_4xx_and_the_server_stays_healthy(hostile_url, base_url):
    with httpx.Client(base_url=hostile_url, timeout=60) as c:
        for name, text in HOSTILE.items():
            r = c.post("/v1/predict", content=json.dumps({"texts": [text]}), headers=JSON)
            check_hostile_answer(text, r.status_code, r.json())
            assert r.status_code == (422 if name in REFUSED else 200), (name, r.text)
            assert c.get("/healthz").status_code == 200
        assert c.post("/v1/predict", json={"texts": list(HOSTILE.values())[2:5]}).status_code == 200
        docs = c.get("/docs")  # behind a route prefix, /docs still finds its own assets
        assert docs.status_code == 200
        for url in docs_assets(docs.text):
            assert url.startswith("/hostile/") and c.get(url[len("/hostile"):]).status_code == 200, url
    with httpx.Client(base_url=base_url, timeout=30) as c:  # the main app was never disturbed
        assert c.post("/v1/predict", json={"texts": ["fly to boston"]}, headers=AUTH).status_code == 200


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_artifact, tiny_encoder, quick_data):
    """A SQLite MLflow registry with two versions of a tiny model (different seeds, so different
    answers) and ``champion`` on version 1."""
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer

    from mtl.model import MultiTaskModel
    from pipelines.data import task_infos

    cfg, data = quick_data
    root = tmp_path_factory.mktemp("registry")
    second = root / "v2"
    MultiTaskModel.from_encoder(tiny_encoder, task_infos(cfg, data), seed=7).save(
        second, AutoTokenizer.from_pretrained(str(tiny_encoder)))
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny-follow")
    for path in (tiny_artifact, second):
        client.create_model_version("tiny-follow", source=str(path))
    client.set_registered_model_alias("tiny-follow", "champion", "1")
    return uri, client, {"1": tiny_artifact, "2": second}


def test_moving_the_alias_under_load_switches_versions_with_no_failed_request(base_url, registry):
    """`mtl-ray serve --model models:/<name>@champion` follows the alias: moved under steady load,
    every request is a 200, answers name the version that gave them, switch from 1 to 2 once and
    stay there, and equal that version's in-process answers."""
    import threading
    import time

    from ray import serve

    from mtl.predictor import Predictor
    from serve.app import build_app, resolve_model

    uri, client, paths = registry
    model = "models:/tiny-follow@champion"
    model_dir, version = resolve_model(model, uri)
    assert version == "1"
    spec = SPEC.model_copy(update={"follow_alias_s": 0.5, "max_batch_tokens": None})
    serve.run(build_app(str(model_dir), spec, model_name=model, tracking_uri=uri, version=version),
              name="follow", route_prefix="/follow")
    want = {v: Predictor.load(p, device="cpu").predict(TEXTS[:2]) for v, p in paths.items()}
    seen: list[tuple[float, int, str | None, list]] = []
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=f"{base_url}/follow", timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", json={"texts": TEXTS[:2]})
                body = r.json()
                seen.append((time.monotonic(), r.status_code, body.get("version"), body.get("predictions")))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        # steady load first: answers from version 1 (not a fixed wait, which a slow replica can outlast)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(v == "1" for _, _, v, _ in seen) < 8:
            time.sleep(0.05)
        assert sum(v == "1" for _, _, v, _ in seen) >= 8, seen[-3:]
        moved = time.monotonic()
        client.set_registered_model_alias("tiny-follow", "champion", "2")
        deadline = moved + 60
        while time.monotonic() < deadline and sum(v == "2" for _, _, v, _ in seen) < 20:
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join()
    with httpx.Client(base_url=f"{base_url}/follow", timeout=30) as c:
        assert c.get("/v1/tasks").json()["version"] == "2"
    serve.delete("follow")
    assert [s for _, s, _, _ in seen if s != 200] == []
    versions = [v for _, _, v, _ in sorted(seen, key=lambda x: x[0])]
    assert set(versions) == {"1", "2"} and versions.count("2") >= 20
    first_two = versions.index("2")
    assert all(v == "2" for v in versions[first_two + 8:])  # in flight at the switch may finish on 1
    switch_s = min(t for t, _, v, _ in seen if v == "2") - moved
    print(f"alias moved: first answer from version 2 after {switch_s:.1f} s; {len(seen)} requests, all 200")
    for _, _, v, preds in seen:
        assert preds == roundtrip(want[v])


def test_per_task_metrics_are_exported_in_prometheus_format(client):
    """A few requests, then Ray's metrics endpoint on this node lists the per-task series."""
    import re
    import time

    import ray

    for tasks in (["intent"], ["slots", "topic"], None):
        body = {"texts": TEXTS[:3], **({"tasks": tasks} if tasks else {})}
        assert client.post("/v1/predict", json=body, headers=AUTH).status_code == 200
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = ["mtl_ray_task_requests", "mtl_ray_task_texts", "mtl_ray_task_latency_ms",
              "mtl_ray_task_top_score", "mtl_ray_batch_texts", "mtl_ray_batch_tokens"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray's agent exports what replicas reported every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted) and 'task="topic"' in text:
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    counts = {m[1]: float(m[2]) for m in re.finditer(
        r'^ray_mtl_ray_task_texts_total\{[^}]*task="(\w+)"[^}]*\}\s+([0-9.e+]+)', text, re.M)
        for m in [(None, m[1], m[2])]}
    # every request of this module counts: at least this test's texts per task
    assert counts["intent"] >= 6 and counts["slots"] >= 6 and counts["topic"] >= 6, counts
    assert re.search(r'mtl_ray_task_top_score_bucket\{[^}]*task="intent"', text)
    assert 'application="mtl-ray"' in text
