"""The HTTP schema of the Serve application and the checks that need no Ray and no model.

Static rules (types, non-empty, no blank text) live in the pydantic models; the limits that come
from the run config's ``serve:`` section (``max_texts``, ``max_chars``) and the model's task list are
checked by :func:`check_request`, which raises :class:`RequestError` with the HTTP status to send.

Answers are passed through from :meth:`mtl.predictor.Predictor.predict` unchanged, so their shape
is the task kind's (a new kind needs no change here):

- sequence classification: ``{"label": str, "score": float}`` (+ ``"top_k": [{label, score}]``
  when ``top_k > 1``)
- multi-label: ``{"labels": [{label, score}]}`` (the labels over the kind's threshold)
- regression: ``{"value": float}``
- token classification: ``{"entities": [{type, text, start, end, score}], "tags": [one per word]}``
  where ``text[start:end]`` of the request's text is the entity's text.

Each task reads a text up to its own ``max_length`` tokens, as training and evaluation do (see
``mtl/predictor.py``): sentence tasks see the first ``max_length`` tokens and later words get no tags.

What texts are taken (``mtl.encoding.text_problem``, the same check the predictor and the file
readers run): a text that is not valid Unicode (a lone surrogate such as ``"\ud800"``, which JSON
can carry) or that has no visible character (empty, whitespace, control or format characters
only: NUL, BOM, zero-width spaces, bidi overrides) is a 422 naming ``texts[i]``. Control and
format characters beside visible text are accepted and ignored by the tokenizer; a word the
tokenizer drops entirely gets the tag ``O``; entity ``start``/``end`` always index the text as
sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from mtl.encoding import text_problem

MAX_TOP_K = 100


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP status, ``message`` the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # picklable, so a deployment handle's caller gets it back as is
        return RequestError, (self.status, self.message)


class PredictRequest(BaseModel):
    """``POST /v1/predict``: texts, optionally a subset of the model's tasks, and ``top_k``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["book a flight from boston to denver"],
                                         "tasks": ["intent", "slots"], "top_k": 1}]},
    )

    texts: list[StrictStr] = Field(min_length=1, description="One or more non-blank texts.")
    tasks: list[StrictStr] | None = Field(
        None, min_length=1, description="Tasks to answer (default: every task of the model).")
    top_k: StrictInt = Field(1, ge=1, le=MAX_TOP_K,
                             description="Classification: also return the k best labels when k > 1.")

    @field_validator("texts")
    @classmethod
    def _no_blank_text(cls, texts: list[str]) -> list[str]:
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise ValueError(f"texts {blank} are empty or blank; every text needs a non-space character")
        problems = [f"texts[{i}] {p}" for i, p in ((i, text_problem(t)) for i, t in enumerate(texts)) if p]
        if problems:
            raise ValueError("; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
        return texts

    @field_validator("tasks")
    @classmethod
    def _dedup_tasks(cls, tasks: list[str] | None) -> list[str] | None:
        return list(dict.fromkeys(tasks)) if tasks is not None else None


class PredictResponse(BaseModel):
    """One ``{task: answer}`` per text, in the request's order."""

    predictions: list[dict[str, dict[str, Any]]]
    model: str
    version: str | None = Field(None, description="The registered model version that answered "
                                                   "(None when serving a directory).")


class TaskInfoOut(BaseModel):
    name: str
    kind: str
    labels: list[str]


class TasksResponse(BaseModel):
    model: str
    version: str | None = None
    tasks: list[TaskInfoOut]


class HealthResponse(BaseModel):
    status: str = "ok"


class ErrorResponse(BaseModel):
    """Every 4xx: ``detail`` is a message, or pydantic's list of field errors for a 422."""

    detail: str | list[dict[str, Any]]


def check_request(req: PredictRequest, known_tasks: list[str], max_texts: int,
                  max_chars: int) -> list[str]:
    """The tasks to run for ``req`` (its subset, in its order, or every known task).

    Raises :class:`RequestError`: 413 for more than ``max_texts`` texts or a text longer than
    ``max_chars`` characters, 422 for a task the model does not have (naming the known ones).
    """
    if len(req.texts) > max_texts:
        raise RequestError(413, f"{len(req.texts)} texts in one request; the limit is {max_texts}")
    long = [i for i, t in enumerate(req.texts) if len(t) > max_chars]
    if long:
        raise RequestError(413, f"texts {long[:10]} are longer than {max_chars} characters "
                                f"(the longest has {max(len(req.texts[i]) for i in long)})")
    if req.tasks is None:
        return list(known_tasks)
    unknown = [t for t in req.tasks if t not in known_tasks]
    if unknown:
        raise RequestError(422, f"unknown task(s) {unknown}; this model has {list(known_tasks)}")
    return list(req.tasks)


def summarize_validation_errors(errors: list[dict[str, Any]]) -> tuple[int, str | list[dict[str, Any]]]:
    """(status, detail) for pydantic/FastAPI validation errors: 400 with a message for a body that
    is not JSON, else 422 with the field errors (loc, msg, type; the input is not echoed back)."""
    for e in errors:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return 400, f"malformed JSON body: {ctx.get('error', e.get('msg', 'invalid JSON'))}"
    return 422, [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                 for e in errors]
