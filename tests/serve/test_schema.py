"""The HTTP schema, the request checks and the deployment options: pure logic, no Ray, no model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mtl.config import RunConfig, ServeSpec
from serve.app import deployment_options, http_options, serve_spec
from serve.schema import PredictRequest, RequestError, check_request, summarize_validation_errors

TASKS = ["intent", "slots", "sentiment", "topic"]


def test_defaults_and_dedup():
    req = PredictRequest.model_validate({"texts": ["hi"]})
    assert req.tasks is None and req.top_k == 1
    req = PredictRequest.model_validate({"texts": ["hi"], "tasks": ["slots", "intent", "slots"], "top_k": 3})
    assert req.tasks == ["slots", "intent"] and req.top_k == 3


@pytest.mark.parametrize("body", [
    {},                                        # texts missing
    {"texts": []},                             # empty list
    {"texts": "one text"},                     # a string, not a list
    {"texts": [1, 2]},                         # not strings
    {"texts": ["ok", None]},
    {"texts": [""]},                           # empty text
    {"texts": ["ok", "  \n\t "]},              # blank text
    {"texts": ["ok"], "tasks": []},            # empty task list (omit it for all tasks)
    {"texts": ["ok"], "tasks": "intent"},
    {"texts": ["ok"], "top_k": 0},
    {"texts": ["ok"], "top_k": "2"},           # strict: no string-to-int coercion
    {"texts": ["ok"], "top_k": True},
    {"texts": ["ok"], "top_k": 1.5},
    {"texts": ["ok"], "top_k": 10_000},
    {"texts": ["ok"], "task": ["intent"]},     # unknown field (a typo of tasks)
])
def test_invalid_bodies(body):
    with pytest.raises(ValidationError):
        PredictRequest.model_validate(body)


def test_blank_text_message_names_the_index():
    with pytest.raises(ValidationError, match=r"texts \[1\]"):
        PredictRequest.model_validate({"texts": ["ok", " "]})


def test_check_request_limits_and_tasks():
    req = PredictRequest(texts=["a", "b"])
    assert check_request(req, TASKS, max_texts=2, max_chars=10) == TASKS
    with pytest.raises(RequestError) as err:
        check_request(PredictRequest(texts=["a"] * 3), TASKS, max_texts=2, max_chars=10)
    assert err.value.status == 413 and "limit is 2" in err.value.message
    with pytest.raises(RequestError) as err:
        check_request(PredictRequest(texts=["a", "x" * 11]), TASKS, max_texts=2, max_chars=10)
    assert err.value.status == 413 and "[1]" in err.value.message and "10 characters" in err.value.message
    assert check_request(PredictRequest(texts=["a"], tasks=["topic", "intent"]), TASKS, 2, 10) == ["topic", "intent"]
    with pytest.raises(RequestError) as err:
        check_request(PredictRequest(texts=["a"], tasks=["intent", "nope"]), TASKS, 2, 10)
    assert err.value.status == 422 and "'nope'" in err.value.message
    assert all(t in err.value.message for t in TASKS)


def test_exactly_at_the_limits_is_fine():
    check_request(PredictRequest(texts=["x" * 10] * 2), TASKS, max_texts=2, max_chars=10)


def test_validation_error_summary():
    status, detail = summarize_validation_errors([{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON decode error",
                                                   "ctx": {"error": "Expecting value"}}])
    assert status == 400 and "malformed JSON" in detail and "Expecting value" in detail
    status, detail = summarize_validation_errors([{"type": "missing", "loc": ("body", "texts"), "msg": "Field required",
                                                   "input": {"x" * 100: 1}}])
    assert status == 422 and detail == [{"loc": ["body", "texts"], "msg": "Field required", "type": "missing"}]


def test_deployment_options_follow_the_spec():
    spec = ServeSpec(min_replicas=1, max_replicas=3, target_ongoing_requests=4, max_ongoing_requests=64,
                     num_cpus=2, num_gpus=0.5)
    opts = deployment_options(spec)
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 3, 4)
    assert auto["upscale_delay_s"] <= 5
    assert opts["max_ongoing_requests"] == 64
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert opts["logging_config"] == {"enable_access_log": False}
    env = deployment_options(ServeSpec(), env={"MTL_RAY_TOKEN": "t"})["ray_actor_options"]["runtime_env"]
    assert env["env_vars"]["MTL_RAY_TOKEN"] == "t" and env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    with pytest.raises(ValueError, match="min_replicas"):
        deployment_options(ServeSpec(min_replicas=3, max_replicas=2))
    with pytest.raises(ValueError, match="CPU only"):
        deployment_options(ServeSpec(quantize=True, num_gpus=1))
    with pytest.raises(ValueError, match="backend onnx runs on CPU only"):
        deployment_options(ServeSpec(backend="onnx", num_gpus=1))


def test_cli_none_means_the_configs_value():
    cfg = RunConfig.model_validate({
        "tasks": [{"name": "t", "kind": "regression", "source": {"type": "csv", "path": "x.csv"}}],
        "serve": {"host": "0.0.0.0", "port": 9001, "quantize": True, "max_texts": 7},
    })
    spec = serve_spec(cfg, host=None, port=None, quantize=None)
    assert (spec.host, spec.port, spec.quantize, spec.max_texts) == ("0.0.0.0", 9001, True, 7)
    spec = serve_spec(cfg, host="127.0.0.1", port=9100, quantize=False)
    assert (spec.host, spec.port, spec.quantize) == ("127.0.0.1", 9100, False)
    assert serve_spec(None) == ServeSpec()


def test_http_options_carry_the_request_timeout():
    assert http_options(ServeSpec()) == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 30.0}
    spec = ServeSpec(host="0.0.0.0", port=9000, request_timeout_s=None)
    assert http_options(spec) == {"host": "0.0.0.0", "port": 9000}  # no limit: Serve's default
    with pytest.raises(ValidationError, match="request_timeout_s"):
        ServeSpec(request_timeout_s=0)


@pytest.mark.parametrize("text,needle", [
    ("hello \ud800 world", "texts[1] contains a lone surrogate U+D800 at character 6"),
    ("\udfff", "texts[1] contains a lone surrogate U+DFFF"),
    ("\u200b\ufeff\u200d", "texts[1] has no visible character"),
    ("\x00\x01 \x7f", "texts[1] has no visible character"),
    ("\u202e\u202c", "texts[1] has no visible character"),
])
def test_texts_the_tokenizer_cannot_take_are_refused_naming_the_index(text, needle):
    with pytest.raises(ValidationError) as err:
        PredictRequest.model_validate({"texts": ["fine", text]})
    assert needle in str(err.value)
    assert text not in str(err.value)  # never echoed


@pytest.mark.parametrize("text", ["a\x00b", "\ufeffhello", "\u202eabc", "a" + "\u0301" * 500,
                                  "\U0001F600" * 50, "x" * 10_000, "tab\tand\nnewline"])
def test_odd_but_valid_texts_are_accepted(text):
    assert PredictRequest.model_validate({"texts": [text]}).texts == [text]


def test_request_error_survives_pickling():
    """A deployment handle's caller gets the replica's RequestError back (Ray pickles it)."""
    import pickle

    err = pickle.loads(pickle.dumps(RequestError(422, "texts[1] bad")))
    assert (type(err), err.status, err.message) == (RequestError, 422, "texts[1] bad")
