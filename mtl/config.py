"""Typed, validated run configuration loaded from YAML with ``key.sub=value`` overrides.

A bad config fails here, before Ray starts, with a message that names the file and the field:

    ConfigError: configs/x.yaml: tasks.1.kind: Input should be 'sequence_classification', ...
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TaskKindName = Literal[
    "sequence_classification", "token_classification", "multi_label", "regression"
]
SourceType = Literal["atis", "rotten_tomatoes", "bbc", "tweets", "csv", "jsonl", "parquet", "conll", "hf_disk"]


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the field."""


class RuleViolations(ValueError):
    """Cross-field rules a config breaks, each as (field, message); ``_format_errors`` names the
    field instead of the model that checked it."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FILE_SOURCES = ("csv", "jsonl", "parquet", "conll")  # read where they lie by Ray Data (pipelines.sources)
PathSpec = str | list[str] | None


def is_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``, ``abfs://...``, ``file://...``: a pyarrow filesystem URI."""
    return "://" in path


def has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def path_list(value: PathSpec) -> list[str]:
    return [] if not value else [value] if isinstance(value, str) else list(value)


class SourceSpec(_Strict):
    """Where a task's examples come from.

    Embedded sources (``atis``, ``rotten_tomatoes``, ``bbc``, ``tweets``) come from PyPI data packages.
    File sources take ``path`` (split by a hash of each text) or ``train``/``validation``/``test``
    paths, and a ``columns`` mapping from the reader's names (``text``, ``label``) to the file's.
    Each path may be one file, a list, a glob or a folder, local or a pyarrow filesystem URI
    (``s3://bucket/prefix/``; S3 options as URI query parameters, e.g.
    ``?endpoint_override=host:port&scheme=http&region=us-east-1``, or the AWS_* variables).
    ``labels`` fixes the task's label list (and its head's outputs); without it the labels are
    those of the train split. An evaluation label outside the list is counted and skipped.
    """

    type: SourceType
    field: Literal["intent", "slots"] | None = None  # atis only: which label the task uses
    path: PathSpec = None
    train: PathSpec = None
    validation: PathSpec = None
    test: PathSpec = None
    columns: dict[str, str] = Field(default_factory=dict)
    # drop exact duplicate texts (keeps the first) before splitting, so no text is in two splits;
    # default: on, except for ATIS, whose standard train/test split is kept as published.
    # File sources split by a hash of the text, which already keeps every text in one split;
    # duplicates inside a split are kept there (dropping them needs a global pass)
    dedup: bool | None = None
    label_separator: str = ";"  # multi_label: how several labels are joined in one cell
    encoding: str = "utf-8"  # csv: the files' text encoding (any Python codec name, e.g. latin-1)
    labels: list[str] | None = None  # the label list, in head order; default: the train split's labels

    @field_validator("path", "train", "validation", "test")
    @classmethod
    def _paths(cls, value: PathSpec) -> PathSpec:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list of paths")
            if any(not p for p in value):
                raise ValueError("an empty path in the list")
        return value

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty label list (leave it out to take the train split's labels)")
        bad = [x for x in value if not x.strip()]
        if bad:
            raise ValueError(f"empty label name(s) {bad}")
        dup = sorted({x for x in value if value.count(x) > 1})
        if dup:
            raise ValueError(f"duplicate label(s) {dup}")
        return value

    @field_validator("encoding")
    @classmethod
    def _codec(cls, value: str) -> str:
        import codecs

        try:
            return codecs.lookup(value).name
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r} (a Python codec name: utf-8, latin-1, cp1252, ...)") from None

    @model_validator(mode="after")
    def _check(self) -> SourceSpec:
        if self.type == "atis" and self.field is None:
            raise ValueError("source.field is required for type 'atis' (intent or slots)")
        if self.type in ("csv", "jsonl", "parquet", "conll", "hf_disk"):
            if not (self.path or self.train):
                raise ValueError(f"source.path (or source.train) is required for type {self.type!r}")
        if self.type == "hf_disk":
            for attr in ("path", "train", "validation", "test"):
                if isinstance(getattr(self, attr), list):
                    raise ValueError(f"source.{attr}: type 'hf_disk' takes one save_to_disk folder, not a list")
        if self.dedup is None:
            self.dedup = self.type != "atis"
        bad = set(self.columns) - {"text", "label", "tokens", "tags"}
        if bad:
            raise ValueError(f"source.columns: unknown reader name(s) {sorted(bad)}; use text, label, tokens, tags")
        return self

    def files(self) -> list[str]:
        return [p for v in (self.path, self.train, self.validation, self.test) for p in path_list(v)]


class AdapterSpec(_Strict):
    """A task's own LoRA adapter (``mtl.adapters``): rank-``rank`` updates, scaled ``alpha/rank``,
    of the encoder's top ``layers`` layers (``targets``: ``qv`` the query and value projections,
    ``all`` every linear map of the layer, attention and feed-forward), on this task's path only
    (the shared pass and every other task are unchanged). ``adapter: lora`` takes the defaults."""

    type: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    layers: int = Field(2, ge=1)
    targets: Literal["qv", "all"] = "qv"


class TaskSpec(_Strict):
    """One task: a name, a kind, a source and its share of the training loss."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    kind: TaskKindName
    source: SourceSpec
    weight: float = Field(1.0, gt=0)  # static loss weight λ
    max_length: int | None = Field(None, ge=8, le=4096)  # tokens; defaults to model.max_length
    max_examples: int | None = Field(None, ge=1)  # per split cap (train; val/test get a tenth, at least 50)
    head_dropout: float = Field(0.1, ge=0, lt=1)
    pooling: Literal["mean", "cls"] = "mean"  # sentence tasks: how token states become one vector
    # tasks with the same ``input`` label the same rows: read, split and tokenized once, and one
    # encoder pass per batch feeds all their heads (e.g. ATIS intent + slots)
    input: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    # a LoRA adapter of this task's own on the top encoder layers (``adapter: lora`` or a mapping
    # of AdapterSpec's fields); trained at train.lr, with the head at train.head_lr
    adapter: AdapterSpec | None = None

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_labels(self) -> TaskSpec:
        labels = self.source.labels
        if labels is None:
            return self
        if self.kind == "regression":
            raise RuleViolations([("source.labels", "a regression task has no labels; remove source.labels")])
        if self.kind == "token_classification":
            bad = [x for x in labels if x != "O" and x[:2] not in ("B-", "I-")]
            if bad:
                raise RuleViolations([("source.labels", f"token tags must be BIO (O, B-X, I-X); found {bad[0]!r}")])
            if "O" not in labels:
                raise RuleViolations([("source.labels", "token tags must include 'O'")])
        return self


class ModelSpec(_Strict):
    encoder: str = "minilm"  # "minilm" (embedded package) or a directory with config.json
    max_length: int = Field(128, ge=8, le=4096)  # tokens, the default for every task


class DataSpec(_Strict):
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    tokenize_batch_size: int = Field(256, ge=1)  # rows per map_batches call
    # CPUs left free for Ray Data's read and tokenize tasks beside the training workers: a run whose
    # workers take every CPU would otherwise wait forever for its data
    cpus: float = Field(1.0, gt=0)


class TrainSpec(_Strict):
    strategy: Literal["ddp", "fsdp"] = "ddp"
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    # Ray's placement of the workers: PACK (fill a node first), SPREAD, STRICT_SPREAD (one per node)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs when the cluster has them
    batch_size: int = Field(32, ge=1)  # global examples per task batch (split across workers)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(1000, ge=1)  # optimizer steps
    lr: float = Field(5e-5, gt=0)
    head_lr: float | None = Field(None, gt=0)  # defaults to lr
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    sampling: Literal["joint", "proportional", "temperature", "round_robin", "annealed"] = "temperature"
    temperature: float = Field(2.0, gt=0)
    weighting: Literal["static", "uncertainty", "dwa", "pcgrad"] = "static"
    dwa_temperature: float = Field(2.0, gt=0)
    comm_hook: Literal["none", "fp16", "bf16"] = "none"
    eval_every: int = Field(200, ge=1)  # optimizer steps between validations
    log_every: int | None = Field(50, ge=1)  # steps between training-loss points and progress lines; None: at evaluations only
    eval_batch_size: int = Field(128, ge=1)
    # batches of rows of similar length (sorted within windows of 50 batches, then shuffled): the
    # same rows each epoch with far less padding, so steps on short, varied texts cost less
    group_by_length: bool = False
    patience: int | None = Field(5, ge=1)  # evaluations without improvement before stopping
    objective: str = "mean"  # "mean" of primary validation metrics, or "<task>.<metric>"
    max_failures: int = Field(2, ge=0)
    seed: int = 13
    threads_per_worker: int | None = Field(None, ge=1)  # torch intra-op threads; None: cpus_per_worker
    # streaming: each worker streams its own shard of every task's splits (Ray Train's streaming
    # split), so no worker holds a whole split; replicated: every worker holds every split and
    # takes its slice of the same seeded global batches, so any worker count trains on exactly
    # the same examples (small data; reproducibility checks)
    data_sharding: Literal["streaming", "replicated"] = "streaming"
    shuffle_buffer: int = Field(1024, ge=1)  # streaming: rows in each worker's local shuffle buffer
    # streaming: batches each worker reads ahead in a background thread, across epoch ends (the next
    # epoch's shard opens while the current one trains); 0 reads each batch in the step
    prefetch_batches: int = Field(16, ge=0)
    # after training: fit one temperature per scored task on the validation split (mtl.calibration),
    # stored in the model's manifest, so served scores are calibrated; labels never change
    calibrate: bool = True


class SearchSpace(_Strict):
    lr: tuple[float, float] = (1e-5, 2e-4)  # log-uniform bounds
    task_weights: bool = True  # sample λ on the simplex, scaled to sum to the number of tasks
    warmup_ratio: list[float] | None = None
    batch_size: list[int] | None = None
    temperature: list[float] | None = None


class TuneSpec(_Strict):
    num_samples: int = Field(4, ge=1)
    search: Literal["random", "optuna"] = "random"
    max_concurrent: int | None = Field(None, ge=1)  # None: as many as the cluster fits
    grace_period: int = Field(1, ge=1)  # evaluations before ASHA may stop a trial
    reduction_factor: int = Field(2, ge=2)
    space: SearchSpace = Field(default_factory=SearchSpace)
    # after the sweep, one more full-budget trial with every λ = 1 and the best trial's lr,
    # to compare tuned weights against equal weights on the validation objective
    compare_equal: bool = False


# serve.ingress haproxy: what Ray's processes need in their environment from their start (Serve's
# HAProxy ingress, throughput-optimized, with handles still callable from synchronous code)
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
               "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}


class ServeSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(32, ge=1)  # requests per batch (when max_batch_tokens is None)
    # batch by tokens instead: requests join a batch up to this many tokens (estimated from words,
    # capped at the model's length per text), so a flood of short queries forms large batches and a
    # long article fills one alone; None: batches of up to max_batch_size requests
    max_batch_tokens: int | None = Field(None, ge=16)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    max_ongoing_requests: int = Field(128, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_texts: int = Field(64, ge=1)  # texts per request
    max_chars: int = Field(5000, ge=1)  # characters per text; longer is a 413
    max_body_bytes: int = Field(1_000_000, ge=1024)
    quantize: bool = False  # int8 dynamic quantization of the encoder's Linear layers (CPU)
    # torch, or ONNX Runtime on CPU (pip install 'mtl-ray[onnx]'; the graph is exported on first use
    # and cached in the artifact's onnx/ folder); with quantize: ONNX Runtime's dynamic int8
    backend: Literal["torch", "onnx"] = "torch"
    token_env: str = "MTL_RAY_TOKEN"  # bearer token read from this variable, when set
    # end-to-end HTTP limit (Serve's http_options, cluster-wide): a request not answered in time gets
    # a 408 instead of waiting forever, e.g. one in flight on a replica that died; None: no limit
    request_timeout_s: float | None = Field(30.0, gt=0)
    # seconds between checks of a models:/<name>@<alias> model's alias; when it moves, each replica
    # loads the new version beside the old and switches between two batches (no request fails)
    follow_alias_s: float | None = Field(10.0, gt=0)
    # haproxy: Ray Serve's HAProxy ingress in its throughput-optimized mode (HAProxy, in C, hands
    # HTTP straight to the replicas; no Python proxy in the path); proxy: Ray Serve's Python HTTP
    # proxy. Read when Ray's processes start: `mtl-ray serve` sets it for the Ray it starts, a
    # cluster needs serve.app.ingress_env() in every node's environment (the k8s manifests set it)
    ingress: Literal["haproxy", "proxy"] = "haproxy"


class MlflowSpec(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "mtl-ray"
    registered_model: str = "mtl-ray"
    enabled: bool = True


class RunConfig(_Strict):
    name: str = "mtl-run"
    output_dir: str = "runs"
    seed: int = 13
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    tasks: list[TaskSpec]
    train: TrainSpec = Field(default_factory=TrainSpec)
    tune: TuneSpec | None = None
    serve: ServeSpec = Field(default_factory=ServeSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        if not tasks:
            raise ValueError("at least one task is required")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate task name(s) {dup}")
        return tasks

    @model_validator(mode="after")
    def _check_rules(self) -> RunConfig:
        """Every cross-field rule, checked here so a config that cannot run fails before Ray starts."""
        problems = (_objective_problems(self) + _parallel_problems(self.train)
                    + _weighting_problems(self) + _space_problems(self) + _input_problems(self)
                    + _adapter_problems(self))
        if problems:
            raise RuleViolations(problems)
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def max_length(self, task: TaskSpec) -> int:
        return task.max_length or self.model.max_length

    @property
    def inputs(self) -> dict[str, list[str]]:
        """What training draws batches of: each shared ``input`` and its tasks, and every other
        task as an input of its own (named after it), in the order of the tasks."""
        out: dict[str, list[str]] = {}
        for t in self.tasks:
            out.setdefault(t.input or t.name, []).append(t.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _objective_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """``train.objective``: ``mean`` or ``<task>.<metric>`` with a metric that task's kind reports."""
    obj = cfg.train.objective
    if obj == "mean":
        return []
    task, _, metric = obj.partition(".")
    if not metric or task not in cfg.task_names:
        return [("train.objective", f"{obj!r}: use 'mean' or '<task>.<metric>' with a task of this config "
                                    f"({', '.join(cfg.task_names)})")]
    from mtl.tasks import KINDS  # imports torch: only for a '<task>.<metric>' objective

    kind = cfg.task(task).kind
    names = KINDS[kind].metric_names
    if metric not in names:
        return [("train.objective", f"{obj!r}: task {task!r} ({kind}) has no metric {metric!r}; "
                                    f"use one of {', '.join(names)}, or 'mean'")]
    return []


def _parallel_problems(tc: TrainSpec) -> list[tuple[str, str]]:
    """Batch splitting, DDP gradient compression and PCGrad's limits."""
    out = []
    if tc.batch_size % (tc.num_workers * tc.grad_accum):
        out.append(("train.batch_size", f"{tc.batch_size} must be a multiple of train.num_workers × "
                                        f"train.grad_accum ({tc.num_workers} × {tc.grad_accum})"))
    if tc.comm_hook != "none":
        if tc.strategy == "fsdp":
            out.append(("train.comm_hook", f"{tc.comm_hook!r} is a DDP gradient hook; FSDP has none "
                                           "(use train.strategy: ddp or train.comm_hook: none)"))
        elif tc.num_workers == 1:
            out.append(("train.comm_hook", f"{tc.comm_hook!r} compresses the all-reduce between workers; "
                                           "with train.num_workers: 1 there is none (use comm_hook: none)"))
    if tc.weighting == "pcgrad":
        # PCGrad projects per-task gradients of one joint step, all-reduced by hand under DDP
        for field, bad, why in (
                ("train.strategy", tc.strategy != "ddp", "needs train.strategy: ddp"),
                ("train.sampling", tc.sampling != "joint", "needs train.sampling: joint (every task each step)"),
                ("train.grad_accum", tc.grad_accum > 1, "needs train.grad_accum: 1 (it projects one step's gradients)"),
                ("train.precision", tc.precision == "fp16",
                 "cannot use train.precision: fp16 (its per-task gradients bypass the loss scaler); use bf16 or fp32")):
            if bad:
                out.append((field, f"train.weighting: pcgrad {why}"))
    return out


def _adapter_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """An adapter re-runs top encoder layers a second time in one forward; FSDP's per-layer
    shards are not tested with that."""
    if cfg.train.strategy != "fsdp":
        return []
    return [(f"tasks.{i}.adapter", "a LoRA adapter needs train.strategy: ddp (FSDP with adapters is not supported)")
            for i, t in enumerate(cfg.tasks) if t.adapter]


def _weighting_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Learned uncertainty weights replace λ, so a set or tuned λ would silently do nothing."""
    if cfg.train.weighting != "uncertainty":
        return []
    out = [(f"tasks.{i}.weight", f"{t.weight:g}: train.weighting: uncertainty learns the task weights, "
                                 "so a static weight λ has no effect; remove it (or use weighting: static)")
           for i, t in enumerate(cfg.tasks) if t.weight != 1.0]
    if cfg.tune is not None and cfg.tune.space.task_weights and len(cfg.tasks) > 1:
        out.append(("tune.space.task_weights", "true with train.weighting: uncertainty: the learned weights "
                                               "override λ, so a λ search has no effect; set it to false"))
    return out


SHAREABLE_SOURCES = ("atis", *FILE_SOURCES[:3])  # sources whose rows can carry one label per task
# what the tasks of one input may set differently: what they label, and how
_LABEL_FIELDS = {"field", "labels", "label_separator"}
_LABEL_COLUMNS = {"label", "tags"}


def _source_key(task: TaskSpec) -> dict[str, Any]:
    """The part of a task's source that decides which rows it reads (not what it labels)."""
    src = task.source.model_dump(exclude=_LABEL_FIELDS)
    src["columns"] = {k: v for k, v in src["columns"].items() if k not in _LABEL_COLUMNS}
    return src


def _input_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Tasks sharing an ``input`` read the same rows: same source (but for what they label), one
    max_length and one max_examples, so one tokenization and one split serve them all."""
    out: list[tuple[str, str]] = []
    first: dict[str, int] = {}
    for i, t in enumerate(cfg.tasks):
        if t.input is None:
            continue
        field = f"tasks.{i}.input"
        if t.input in cfg.task_names:
            out.append((field, f"{t.input!r} is also a task name; name the shared input differently"))
            continue
        if t.input not in first:
            first[t.input] = i
            if sum(u.input == t.input for u in cfg.tasks) < 2:
                out.append((field, f"{t.input!r} is this task's alone; an input is shared by two tasks or "
                                   "more (remove it, or give another task the same input)"))
            elif t.source.type not in SHAREABLE_SOURCES:
                out.append((field, f"source type {t.source.type!r} cannot be shared (its rows carry one "
                                   f"label); shared inputs read {', '.join(SHAREABLE_SOURCES)}"))
            continue
        j = first[t.input]
        ref = cfg.tasks[j]
        mine, theirs = _source_key(t), _source_key(ref)
        diff = sorted(k for k in mine if mine[k] != theirs[k])
        if diff:
            k = diff[0]
            out.append((field, f"{t.input!r}: source differs from tasks.{j} ({k} {mine[k]!r} vs {theirs[k]!r}); "
                               "tasks of one input read the same rows and differ only in what they label"))
        elif cfg.max_length(t) != cfg.max_length(ref):
            out.append((field, f"{t.input!r}: max_length {cfg.max_length(t)} differs from tasks.{j} "
                               f"({cfg.max_length(ref)}); tasks of one input are tokenized once, at one length"))
        elif t.max_examples != ref.max_examples:
            out.append((field, f"{t.input!r}: max_examples {t.max_examples} differs from tasks.{j} "
                               f"({ref.max_examples}); tasks of one input are capped once"))
    return out


def _space_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """``tune.space`` values the trainer cannot run."""
    if cfg.tune is None:
        return []
    space, tc = cfg.tune.space, cfg.train
    out = []
    lo, hi = space.lr
    if lo > hi:
        out.append(("tune.space.lr", f"lower bound {lo} is above the upper bound {hi}"))
    bad = [b for b in space.batch_size or [] if b % (tc.num_workers * tc.grad_accum)]
    if bad:
        out.append(("tune.space.batch_size", f"{bad} not a multiple of train.num_workers × train.grad_accum "
                                             f"({tc.num_workers} × {tc.grad_accum})"))
    bad_w = [w for w in space.warmup_ratio or [] if not 0 <= w < 1]
    if bad_w:
        out.append(("tune.space.warmup_ratio", f"{bad_w} not in [0, 1)"))
    bad_t = [t for t in space.temperature or [] if t <= 0]
    if bad_t:
        out.append(("tune.space.temperature", f"{bad_t} not positive"))
    return out


def check_config(cfg: RunConfig, origin: str = "<config>") -> None:
    """Validate again (a config changed in code, e.g. ``model_copy(update=...)``, skips validation);
    raises ``ConfigError`` naming the field."""
    config_from_dict(cfg.to_dict(), origin)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (YAML-typed values; list items by index, ``tasks.0.weight=2``)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: {part!r} is not an index of {'.'.join(parts[:i])}")
                if last:
                    node[int(part)] = _parse_scalar(value)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse_scalar(value)
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is not a mapping")
    return out


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        rules = (e.get("ctx") or {}).get("error")
        if isinstance(rules, RuleViolations):
            lines += [f"{origin}: {'.'.join([*loc, field])}: {msg}" for field, msg in rules.problems]
        else:
            lines.append(f"{origin}: {'.'.join(loc) or '(top level)'}: {e['msg']}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], origin: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML config. Relative data paths resolve against the YAML's folder
    when they exist there, else against the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    cfg = config_from_dict(raw, str(path))
    for i, task in enumerate(cfg.tasks):
        src = task.source
        for attr in ("path", "train", "validation", "test"):
            value = getattr(src, attr)
            if not value:
                continue
            resolved = [_resolve_data_path(p, path.parent) for p in path_list(value)]
            for j, p in enumerate(resolved):
                if not _data_path_exists(p):
                    field = f"tasks.{i}.source.{attr}" + (f".{j}" if isinstance(value, list) else "")
                    what = "no file matches" if has_glob(p) else "file not found"
                    raise ConfigError(f"{path}: {field}: {what}: {path_list(value)[j]}")
            setattr(src, attr, resolved if isinstance(value, list) else resolved[0])
    return cfg


def _data_path_exists(p: str) -> bool:
    """Local paths are checked here (a glob must match something); URIs when they are read."""
    if is_uri(p):
        return True
    if has_glob(p):
        import glob

        return bool(glob.glob(p, recursive=True))
    return Path(p).exists()


def _resolve_data_path(value: str, folder: Path) -> str:
    """A relative local path (or glob) against the YAML's folder when it exists there, else as is."""
    if is_uri(value) or Path(value).is_absolute() or _data_path_exists(value):
        return value
    candidate = str(folder / value)
    return candidate if _data_path_exists(candidate) else value
