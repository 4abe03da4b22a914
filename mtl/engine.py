"""The training engine: one shared encoder, its task heads and loss weighting, trained with no Ray.

    engine = Engine(model, data, EngineConfig(max_steps=60, batch_size=16, lr=3e-3))
    engine.fit()                         # one process; or under any torch.distributed process group

``data`` is ``{task: {"train": ..., "validation": ...}}``. A split is either

- a dict of numpy arrays (``input_ids``, ``attention_mask``, ``labels``, ``idx``) holding the whole
  split on every rank: every rank draws the same global batches (``BatchStream``) and takes its
  own slice of each (``rows[rank::world]``), so 1 process and N processes at the same global
  batch train on exactly the same examples (tests, benchmarks, small data); or
- this rank's own shard: ``StreamBatches`` for training (batches streamed from whatever sharded
  the data, e.g. Ray Train's streaming split, re-iterated per epoch) and ``Shard`` for
  evaluation. No rank then holds a whole split.

Tasks that share their rows (``inputs``: ``{name: [task, ...]}``, from ``RunConfig.inputs``) train
from one split under the input's name, ``data[name]["train"]``, whose batches carry
``labels.<task>`` for each task (``mtl.encoding.encode_input_batch``); their validation splits stay
per task. The sampler draws among inputs (a task of its own is an input of one), and a shared
input's batch goes through the encoder once for all its heads.

Every rank draws the same input sequence (``TaskSampler``) either way. One optimizer step is
``grad_accum`` micro-batches of each sampled input; validation every ``eval_every`` steps; early
stopping on the objective after ``patience`` evaluations without improvement.

Logging, checkpoint reporting and fault injection attach from outside as ``Callback`` objects.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from mtl import distributed as D
from mtl.encoding import labels_column
from mtl.evaluation import evaluate_arrays, flatten_metrics, objective, trim
from mtl.model import MultiTaskModel
from mtl.sampling import BatchStream, TaskSampler
from mtl.weighting import LossWeighting, pcgrad_combine

# ids [B, L], mask [B, L], labels; a shared input's batch has one labels tensor per task ({task: labels})
Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | dict[str, torch.Tensor] | None"]


@dataclass
class EngineConfig:
    """What the engine needs to train; field names match ``train:`` in the YAML config."""

    max_steps: int  # optimizer steps
    batch_size: int = 32  # global rows of each sampled task per optimizer step (all ranks, all micro-batches)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5  # encoder learning rate
    head_lr: float | None = None  # heads and loss weights; None: lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06  # fraction of max_steps of linear warm-up, then linear decay to 0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; GradScaler only for CUDA fp16)
    sampling: str = "temperature"
    temperature: float = 2.0
    weighting: str = "static"  # static | uncertainty | dwa | pcgrad
    task_weights: dict[str, float] | None = None  # static λ per task; None: 1 each
    dwa_temperature: float = 2.0
    comm_hook: str = "none"  # DDP gradient compression: none | fp16 | bf16
    eval_every: int = 200  # optimizer steps between validations
    eval_batch_size: int = 128
    # batches of rows of similar length (mtl.sampling.length_batches): less padding, the same rows;
    # arrays here, and the training glue's streamed shards (pipelines.sharding)
    group_by_length: bool = False
    patience: int | None = 5  # evaluations without improvement before stopping; None: never
    objective: str = "mean"
    seed: int = 13

    @classmethod
    def from_train(cls, train: Any, **overrides: Any) -> EngineConfig:
        """From a ``TrainSpec`` (or anything with the same attributes); ``None`` overrides are ignored."""
        values = {f.name: getattr(train, f.name) for f in fields(cls) if hasattr(train, f.name)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class StreamBatches:
    """This rank's shard of a task's training split, streamed.

    ``epoch(e)`` returns a fresh iterator over this rank's batches for epoch ``e`` (dicts of numpy
    arrays with ``input_ids``, ``attention_mask``, ``labels``), ``batches_per_epoch`` of them on
    every rank, so ranks stay in step. ``size`` is the whole split's row count (the task sampler
    weighs tasks by it). Batches are drawn in order; a resumed run skips to its position.

    With ``prefetch`` > 0 a background thread reads up to that many batches ahead, across epoch
    ends: the next epoch's iterator (for a Ray Data shard: a new streaming execution and a refilled
    shuffle buffer) is opened while the step still trains on the current one, so an epoch's start
    is not a stall. With 0, batches are read in the step (and each epoch opened when first asked)."""

    def __init__(self, epoch: Callable[[int], Iterable[dict[str, np.ndarray]]], size: int, batches_per_epoch: int,
                 prefetch: int = 0):
        if batches_per_epoch < 1:
            raise ValueError("batches_per_epoch must be at least 1")
        if prefetch < 0:
            raise ValueError("prefetch must be at least 0")
        self.epoch, self.size, self.per_epoch, self.prefetch = epoch, size, batches_per_epoch, prefetch
        self._it: Any = None
        self._at = (-1, 0)  # (epoch, next position) of the open iterator
        self._reader: _Reader | None = None

    def batch(self, k: int) -> dict[str, np.ndarray]:
        if self.prefetch:
            if self._reader is None or self._reader.next_k != k:
                self.close()
                self._reader = _Reader(self, k)
            return self._reader.get()
        epoch, pos = divmod(k, self.per_epoch)
        if self._it is None or self._at[0] != epoch or self._at[1] > pos:
            self._close()
            self._it, self._at = iter(self.epoch(epoch)), (epoch, 0)
        while self._at[1] < pos:  # resuming mid-epoch: skip what was trained on
            next(self._it)
            self._at = (epoch, self._at[1] + 1)
        out = next(self._it, None)
        if out is None:
            raise RuntimeError(f"epoch {epoch} of this shard ended after {pos} batches; "
                               f"{self.per_epoch} were expected")
        self._at = (epoch, pos + 1)
        if pos + 1 == self.per_epoch:
            self._close()  # the epoch is done: drain it so every rank ends it together
        return out

    def close(self) -> None:
        """Stop reading ahead (the background reader finishes the epoch it is in, so every rank
        ends it together, and exits)."""
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        self._close()

    def _close(self) -> None:
        if self._it is not None:
            for _ in self._it:
                pass
        self._it, self._at = None, (-1, 0)


class _Reader:
    """``StreamBatches``' background reader: batches ``k``, ``k + 1``, ... into a bounded queue,
    epoch after epoch; an error in the source reaches the consumer at the batch it broke."""

    def __init__(self, stream: StreamBatches, k: int):
        self.stream, self.next_k = stream, k
        self.queue: queue.Queue = queue.Queue(maxsize=stream.prefetch)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(k,), name="mtl-prefetch", daemon=True)
        self.thread.start()

    def get(self) -> dict[str, np.ndarray]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            self.stream._reader = None  # a later call starts afresh
            raise item
        self.next_k += 1
        return item

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)

    def _put(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, k: int) -> None:
        per = self.stream.per_epoch
        epoch, skip = divmod(k, per)
        try:
            while not self.stopping.is_set():
                n = 0
                for b in self.stream.epoch(epoch):  # always read to the end: ranks end epochs together
                    if skip <= n < per and not self.stopping.is_set():
                        self._put(b)
                    n += 1
                if n < per:
                    raise RuntimeError(f"epoch {epoch} of this shard ended after {n} batches; {per} were expected")
                epoch, skip = epoch + 1, 0
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(e)


class Shard:
    """This rank's own rows of an evaluation split, as numpy arrays; ``load`` is called once, at
    the first evaluation (so a lazily streamed shard is read only when needed)."""

    def __init__(self, load: Callable[[], dict[str, np.ndarray]]):
        self._load, self._arrays = load, None

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = self._load()
        return self._arrays


class ArrayBatches:
    """The whole training split on every rank: the ``k``-th global batch is a seeded permutation
    slice (``BatchStream``); this rank takes ``rows[rank::world]`` of it."""

    def __init__(self, arrays: dict[str, np.ndarray], global_batch: int, seed: int, task_id: int,
                 rank: int, world: int, group_by_length: bool = False):
        self.arrays, self.rank, self.world = arrays, rank, world
        self.size = len(arrays["input_ids"])
        lengths = np.asarray(arrays["attention_mask"]).sum(1) if group_by_length else None
        self.stream = BatchStream(self.size, global_batch, seed, task_id, lengths)

    def batch(self, k: int) -> dict[str, np.ndarray]:
        rows = self.stream.batch_indices(k)[self.rank::self.world]
        return {c: v[rows] for c, v in self.arrays.items() if c != "idx"}


class Callback:
    """Hooks the engine calls on every rank, in list order. Collectives inside a hook must be
    called by every rank; rank-0-only work checks ``engine.rank``."""

    def on_fit_start(self, engine: Engine) -> None:
        """Before the first step of ``fit`` (after any ``load_state_dict``)."""

    def on_step_end(self, engine: Engine, step: int) -> None:
        """After optimizer step ``step`` (1-based); ``engine.last_losses`` holds its per-task losses."""

    def on_evaluate(self, engine: Engine, step: int, metrics: dict[str, Any]) -> None:
        """After the validation at ``step``; ``metrics`` as ``Engine.end_window`` returns them."""


class TrainModule(nn.Module):
    """The model and its loss weighting in one module, so DDP/FSDP synchronise learned weights too.

    ``forward(batches)`` -> (weighted total loss, per-task losses); ``forward(batches, logits=True)``
    -> per-task logits. ``batches`` maps a task to its batch, or a shared input to its batch with
    one labels tensor per task (``{task: labels}``): one encoder pass then feeds every head of the
    input. Heads, adapters (and log-variances) of tasks not in this step join the graph with a zero factor,
    so DDP needs no unused-parameter search."""

    def __init__(self, model: MultiTaskModel, weighting: LossWeighting):
        super().__init__()
        self.model = model
        self.weighting = weighting

    def forward(self, batches: dict[str, Batch], logits: bool = False):
        out, labels = {}, {}
        for key, (ids, mask, lab) in batches.items():
            if isinstance(lab, dict):  # a shared input: one encoder pass, every head of its tasks
                out.update(self.model(ids, mask, list(lab)))
                labels.update(lab)
            else:
                out[key] = self.model(ids, mask, [key])[key]
                labels[key] = lab
        if logits:
            return out
        losses = {t: self.model.kinds[t].loss(out[t], labels[t]) for t in out}
        total = self.weighting(losses)
        unused = [p for part in (self.model.heads, self.model.adapters) for t, h in part.items() if t not in out
                  for p in h.parameters() if p.requires_grad]
        unused += self.weighting.unused_parameters(list(out))
        if unused:
            total = total + 0.0 * sum(p.sum() for p in unused)
        return total, {t: v.detach() for t, v in losses.items()}


def param_groups(module: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: encoder (and LoRA adapters) with/without decay at ``lr``; heads and loss
    weights at ``head_lr``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        head = ".heads." in f".{name}" or "weighting." in name
        no_decay = p.ndim < 2 or "LayerNorm" in name or "log_vars" in name
        groups.setdefault((head, no_decay), []).append(p)
    return [
        {"params": ps, "lr": head_lr if head else lr, "weight_decay": 0.0 if nd else weight_decay}
        for (head, nd), ps in sorted(groups.items())
    ]


def make_optimizer(module: nn.Module, lr: float, head_lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused where torch has the kernel (CPU, CUDA): one pass over all
    parameters instead of a loop of small ops. Same update rule; on the quiet 2-core dev CPU one
    MiniLM AdamW step took 11 ms fused against 66 ms foreach (a training step is about 1 s there)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(module, lr, head_lr, weight_decay), lr=lr, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_ratio: float, max_steps: int):
    """transformers' linear warm-up over ``int(warmup_ratio·max_steps)`` steps (lr 0 at step 0),
    then linear decay to 0 at ``max_steps``."""
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * max_steps), max_steps)


def check_inputs(inputs: dict[str, list[str]] | None, names: list[str]) -> dict[str, list[str]]:
    """``inputs`` covering exactly the trained ``names`` (each task in one input; a shared input's
    name is no task's), in the order of the tasks; None: every task an input of its own."""
    if inputs is None:
        return {t: [t] for t in names}
    inputs = {i: [t for t in ts if t in names] for i, ts in inputs.items()}
    inputs = {i: ts for i, ts in inputs.items() if ts}
    listed = [t for ts in inputs.values() for t in ts]
    if sorted(listed) != sorted(names):
        raise ValueError(f"inputs {inputs} must hold each trained task ({names}) exactly once")
    clash = [i for i, ts in inputs.items() if ts != [i] and i in names]
    if clash:
        raise ValueError(f"shared input(s) {clash} carry a task's name")
    order = {t: n for n, t in enumerate(names)}
    return dict(sorted(inputs.items(), key=lambda kv: min(order[t] for t in kv[1])))


def check_config(config: EngineConfig, world: int) -> None:
    """Reject settings the engine cannot honour, naming the field."""
    per_rank, rem = divmod(config.batch_size, world * config.grad_accum)
    if rem or per_rank == 0:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of world size × grad_accum "
                         f"({world} × {config.grad_accum})")
    if config.weighting == "pcgrad" and config.sampling != "joint":
        raise ValueError("weighting=pcgrad needs sampling=joint (it projects the tasks of one step)")
    if config.weighting == "pcgrad" and config.comm_hook != "none":
        raise ValueError(f"comm_hook={config.comm_hook!r} has no effect with weighting=pcgrad: PCGrad "
                         "all-reduces its per-task gradients itself, outside DDP's hooks")
    if config.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {config.precision!r}: use fp32, bf16 or fp16")


class Engine:
    """Owns the TrainModule, optimizer, schedule, AMP, sampler position and the best objective.

    ``wrap`` (e.g. ``shard_fsdp``/``wrap_ddp`` from ``mtl.distributed``, or Ray's ``prepare_model``)
    turns the TrainModule into what is trained; without it the module is moved to ``device``."""

    def __init__(self, model: MultiTaskModel, data: dict[str, dict[str, dict[str, np.ndarray]]],
                 config: EngineConfig, *, device: torch.device | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, callbacks: Iterable[Callback] = (),
                 tasks: Iterable[str] | None = None, inputs: dict[str, list[str]] | None = None):
        self.config = c = config
        self.device = device or torch.device("cpu")
        self.rank, self.world = D.world_info()
        check_config(c, self.world)
        # the tasks trained, sampled and evaluated (default: all the model's); ``data`` holds only these
        self.names = list(tasks) if tasks is not None else list(model.tasks)
        unknown = [t for t in self.names if t not in model.tasks]
        if unknown:
            raise ValueError(f"tasks {unknown} are not in the model ({list(model.tasks)})")
        self.data = data
        self.callbacks = list(callbacks)
        method = "static" if c.weighting == "pcgrad" else c.weighting
        weighting = LossWeighting(self.names, method, c.task_weights, c.dwa_temperature)
        self.raw = TrainModule(model, weighting)
        self.module = wrap(self.raw) if wrap else self.raw.to(self.device)
        if c.weighting == "pcgrad" and D.is_fsdp(self.module):
            raise ValueError("weighting=pcgrad needs a DDP or plain module, not FSDP (it needs whole gradients)")
        D.attach_comm_hook(self.module, c.comm_hook)
        self.optimizer = make_optimizer(self.module, c.lr, c.head_lr or c.lr, c.weight_decay, self.device)
        self.scheduler = make_scheduler(self.optimizer, c.warmup_ratio, c.max_steps)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.precision)
        cuda_fp16 = self.amp_dtype is torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if cuda_fp16 else None
        # what training draws batches of: shared inputs and tasks of their own (input name -> tasks)
        self.inputs = check_inputs(inputs, self.names)
        micro = c.batch_size // c.grad_accum  # global rows per micro-batch
        self.train_batches = {
            i: data[i]["train"] if isinstance(data[i]["train"], StreamBatches)
            else ArrayBatches(data[i]["train"], micro, c.seed, n, self.rank, self.world, c.group_by_length)
            for n, i in enumerate(self.inputs)
        }
        sizes = [self.train_batches[i].size for i in self.inputs]
        self.sampler = TaskSampler(list(self.inputs), sizes, c.sampling, c.temperature, c.max_steps, c.seed)
        self.step = 0
        self.consumed = {i: 0 for i in self.inputs}  # micro-batches drawn, per input
        self.best_objective, self.best_step, self.bad_evals = -math.inf, -1, 0
        self.examples = 0  # training rows seen, all ranks (a shared input's row counts once)
        self.train_s = 0.0  # seconds in training steps during this fit
        self.data_s = 0.0  # of which: waiting for training batches (a streamed shard's iterator)
        self.history: list[dict[str, float]] = []  # one record of scalars per evaluation
        self.last_losses: dict[str, float] = {}
        self._window: dict[str, list[float]] = {t: [] for t in self.names}
        self._examples_at_start = 0

    @property
    def kinds(self):
        return self.raw.model.kinds

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def batch(self, name: str, k: int) -> Batch:
        """This rank's part of the ``k``-th global training micro-batch of input ``name`` (a task, or
        a shared input: then labels are ``{task: labels}``), padding trimmed."""
        t0 = time.perf_counter()
        arr = self.train_batches[name].batch(k)
        self.data_s += time.perf_counter() - t0

        def tensor(c: str) -> torch.Tensor:  # streamed batches are read-only Arrow views: copy, not alias
            return torch.as_tensor(np.array(arr[c]), device=self.device)

        ids, mask = tensor("input_ids"), tensor("attention_mask")
        tasks = self.inputs[name]
        if tasks == [name]:
            return trim(ids, mask, tensor("labels"))
        labels = {t: trim(ids, mask, tensor(labels_column(t)))[2] for t in tasks}
        return (*trim(ids, mask)[:2], labels)

    # ------------------------------------------------------------------ one optimizer step

    def compute_gradients(self) -> dict[str, float]:
        """Forward and backward over ``grad_accum`` micro-batches of this step's tasks, leaving the
        (unscaled) mean gradient in ``.grad``; returns each task's mean loss over the micro-batches."""
        c = self.config
        inputs = self.sampler.tasks_for_step(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        step_losses: dict[str, float] = {}
        for a in range(c.grad_accum):
            batches = {}
            for i in inputs:
                batches[i] = self.batch(i, self.consumed[i])
                self.consumed[i] += 1
            if c.weighting == "pcgrad":
                losses = self._pcgrad_backward(batches)
            else:
                losses = self._backward(batches, last=a == c.grad_accum - 1)
            for t, v in losses.items():
                step_losses[t] = step_losses.get(t, 0.0) + float(v) / c.grad_accum
            self.examples += sum(len(b[0]) for b in batches.values()) * self.world
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        return step_losses

    def _backward(self, batches: dict[str, Batch], last: bool) -> dict[str, torch.Tensor]:
        """One micro-batch through the (wrapped) module; DDP all-reduces on the last one only."""
        no_sync = getattr(self.module, "no_sync", None)
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with self.autocast():
                total, losses = self.module(batches)
            total = total / self.config.grad_accum
            (self.scaler.scale(total) if self.scaler else total).backward()
        return losses

    def _pcgrad_backward(self, batches: dict[str, Batch]) -> dict[str, torch.Tensor]:
        """PCGrad on one micro-batch: per-task gradients of all parameters (autograd.grad, so DDP's
        all-reduce hooks do not fire), averaged across ranks by hand, projected, added to ``.grad``.
        Each task loss is divided by ``grad_accum`` and scaled like the plain path's, so clipping,
        the GradScaler's unscale and the optimizer see the same quantities either way."""
        params = [p for p in self.raw.parameters() if p.requires_grad]
        weights = self.raw.weighting.static
        flats, losses = [], {}
        per_task = [(t, ids, mask, lab[t] if isinstance(lab, dict) else lab)
                    for key, (ids, mask, lab) in batches.items() for t in self.inputs[key]]
        for t, ids, mask, labels in per_task:  # a shared input's tasks each run the encoder here
            with self.autocast():
                logits = self.raw.model(ids, mask, [t])[t]
            loss = self.raw.model.kinds[t].loss(logits, labels) * weights[t]
            losses[t] = loss.detach()
            loss = loss / self.config.grad_accum
            grads = torch.autograd.grad(self.scaler.scale(loss) if self.scaler else loss, params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
            flats.append(D.all_mean_tensor(flat))
        combined = pcgrad_combine(flats, seed=self.step)
        offset = 0
        for p in params:
            n = p.numel()
            g = combined[offset:offset + n].view_as(p)
            p.grad = g.clone() if p.grad is None else p.grad + g
            offset += n
        return losses

    def apply_gradients(self, losses: dict[str, float]) -> None:
        """Clip, AdamW (through the GradScaler when there is one), advance the schedule and the
        step; ``losses`` (from ``compute_gradients``) join the evaluation window."""
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        for t, v in losses.items():
            self._window[t].append(v)
        self.last_losses = losses

    def train_step(self) -> dict[str, float]:
        """One optimizer step: gradients, clipping, AdamW, schedule. Returns per-task losses."""
        t0 = time.perf_counter()
        losses = self.compute_gradients()
        self.apply_gradients(losses)
        self.train_s += time.perf_counter() - t0
        return losses

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str = "validation") -> dict[str, dict[str, float]]:
        """Each task's metrics on ``split``, every rank evaluating its own rows (its ``Shard``, or
        ``rows[rank::world]`` of a whole split) and rank 0 scoring the gathered predictions; the
        result is the same on every rank."""
        self.module.eval()
        results = {}
        for t in self.names:
            mine = self.eval_rows(t, split)
            # every rank makes as many forward calls as the rank with the most rows (FSDP collectives)
            longest = max(D.gather(len(mine["input_ids"])))
            n_batches = math.ceil(longest / self.config.eval_batch_size)
            with self.autocast():
                preds, refs = evaluate_arrays(lambda i, m, t=t: self.module({t: (i, m, None)}, logits=True)[t],
                                              self.kinds[t], mine, self.config.eval_batch_size, self.device,
                                              n_batches)
            gathered = D.gather((preds, refs))
            if self.rank == 0:
                results[t] = self.kinds[t].metrics([x for g in gathered for x in g[0]],
                                                   [x for g in gathered for x in g[1]])
        self.module.train()
        return D.broadcast(results)

    def eval_rows(self, task: str, split: str) -> dict[str, np.ndarray]:
        part = self.data[task][split]
        if isinstance(part, Shard):
            return part.arrays()
        return {k: v[self.rank::self.world] for k, v in part.items()}

    def end_window(self) -> dict[str, Any]:
        """Close an evaluation window: mean training loss per task over it (all ranks), DWA update,
        validation, best objective and patience. Returns scalar metrics plus ``validation``."""
        seen = [t for t in self.names if self._window[t]]
        means = D.all_mean([float(np.mean(self._window[t])) for t in seen], self.device)
        train_loss = dict(zip(seen, means))
        self._window = {t: [] for t in self.names}
        self.raw.weighting.end_window(train_loss)
        val = self.evaluate()
        obj = objective(val, self.kinds, self.config.objective)
        if obj > self.best_objective:
            self.best_objective, self.best_step, self.bad_evals = obj, self.step, 0
        else:
            self.bad_evals += 1
        patience = self.config.patience
        metrics: dict[str, Any] = {
            "step": self.step, "objective": obj, "best_objective": self.best_objective,
            "best_step": self.best_step, "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": (self.examples - self._examples_at_start) / max(self.train_s, 1e-9),
            "data_wait_frac": self.data_s / max(self.train_s, 1e-9),  # of training-step time, this fit
            "examples": self.examples,
            **flatten_metrics("val", val),
            **{f"train/loss/{t}": v for t, v in train_loss.items()},
            **{f"weight/{t}": v for t, v in self.raw.weighting.weights().items()},
            "stopped_early": float(patience is not None and self.bad_evals >= patience),
        }
        self.history.append(dict(metrics))
        metrics["validation"] = val
        return metrics

    def fit(self) -> dict[str, Any] | None:
        """Train from the current step to ``max_steps`` or an early stop; the last evaluation's
        metrics (None if no evaluation ran)."""
        c = self.config
        self.module.train()
        self._examples_at_start, self.train_s, self.data_s = self.examples, 0.0, 0.0
        last = None
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.step < c.max_steps:
            self.train_step()
            for cb in self.callbacks:
                cb.on_step_end(self, self.step)
            if self.step % c.eval_every == 0 or self.step == c.max_steps:
                last = self.end_window()
                for cb in self.callbacks:
                    cb.on_evaluate(self, self.step, last)
                if last["stopped_early"]:
                    break
        return last

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs. ``model`` and ``weighting`` are unsharded CPU tensors
        without the TrainModule prefix. Under FSDP every rank must call it (a collective) and only
        rank 0's result is complete: save rank 0's and load that on every rank."""
        full = D.full_state(self.module)
        return {
            "model": {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")},
            "weighting": {k[len("weighting."):]: v for k, v in full.items() if k.startswith("weighting.")},
            "weighting_extra": self.raw.weighting.extra_state(),
            "optimizer": D.optim_state(self.module, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step, "consumed": dict(self.consumed), "examples": self.examples,
            "best_objective": self.best_objective, "best_step": self.best_step, "bad_evals": self.bad_evals,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output. ``model`` may be absent (the caller built the model
        from a saved artifact); then only the loss weighting's parameters are loaded."""
        module_state = {f"weighting.{k}": v for k, v in state.get("weighting", {}).items()}
        if "model" in state:
            module_state.update({f"model.{k}": v for k, v in state["model"].items()})
        if module_state:
            D.load_full_state(self.module, module_state, strict="model" in state)
        self.raw.weighting.load_extra_state(state.get("weighting_extra", {}))
        D.load_optim_state(self.module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.consumed = {i: int(state["consumed"].get(i, 0)) for i in self.inputs}
        self.examples = int(state.get("examples", 0))
        self.best_objective = float(state.get("best_objective", -math.inf))
        self.best_step = int(state.get("best_step", -1))
        self.bad_evals = int(state.get("bad_evals", 0))
        self.history = list(state.get("history", []))

