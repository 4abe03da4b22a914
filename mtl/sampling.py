"""Which task(s) each optimizer step trains on.

The choice is a pure function of (seed, step), so every worker draws the same task sequence with
no communication, and a resumed run continues the sequence where it stopped.

Strategies (n_i = training examples of task i, K tasks, S steps):
    joint         every task each step (loss = Σ λ_i L_i)
    proportional  p_i ∝ n_i
    temperature   p_i ∝ n_i^(1/T)                   (T=1 proportional, T→∞ uniform)
    round_robin   task (step mod K)
    annealed      p_i ∝ n_i^α, α = 1 − 0.8·step/(S−1)  (Stickland & Murray, 2019)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

STRATEGIES = ("joint", "proportional", "temperature", "round_robin", "annealed")
# group_by_length: batches per window sorted by length (the "mega-batch" of Hugging Face's
# LengthGroupedSampler): wide enough that most batches hold rows of one length, narrow enough that
# the order of windows (and so of the data) stays random
GROUP_BATCHES = 50


def temperature_probs(sizes: list[int], temperature: float) -> np.ndarray:
    """p_i ∝ n_i^(1/T), normalised."""
    w = np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
    return w / w.sum()


class TaskSampler:
    def __init__(self, tasks: list[str], sizes: list[int], strategy: str = "temperature",
                 temperature: float = 2.0, total_steps: int = 1, seed: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sampling {strategy!r}; use one of {STRATEGIES}")
        if len(tasks) != len(sizes) or not tasks:
            raise ValueError("tasks and sizes must be non-empty and of equal length")
        self.tasks = list(tasks)
        self.sizes = list(sizes)
        self.strategy = strategy
        self.temperature = temperature
        self.total_steps = max(1, total_steps)
        self.seed = seed

    def alpha(self, step: int) -> float:
        """The annealed exponent at ``step``: 1 at the start, 0.2 at the last step."""
        return 1.0 - 0.8 * min(step, self.total_steps - 1) / max(1, self.total_steps - 1)

    def probabilities(self, step: int) -> np.ndarray:
        """Sampling distribution over tasks at ``step`` (uniform for round_robin, ones for joint)."""
        k = len(self.tasks)
        if self.strategy == "joint":
            return np.ones(k)
        if self.strategy == "round_robin":
            return np.full(k, 1.0 / k)
        if self.strategy == "proportional":
            return temperature_probs(self.sizes, 1.0)
        if self.strategy == "temperature":
            return temperature_probs(self.sizes, self.temperature)
        return temperature_probs(self.sizes, 1.0 / self.alpha(step))

    def tasks_for_step(self, step: int) -> list[str]:
        if self.strategy == "joint":
            return list(self.tasks)
        if self.strategy == "round_robin":
            return [self.tasks[step % len(self.tasks)]]
        rng = np.random.default_rng([self.seed, step])
        return [self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities(step)))]]


def length_batches(rows: np.ndarray, lengths: np.ndarray, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``rows`` (already shuffled) as batches of ``batch`` rows of similar length: cut into windows
    of ``GROUP_BATCHES`` batches, each window sorted by length (``lengths[row]``) and cut into
    batches, the batches of a window in a random order. The same rows and the same number of
    batches as cutting ``rows`` directly (a short batch only where ``rows`` ends), with far less
    padding: a batch is padded to its longest row."""
    out: list[np.ndarray] = []
    window = GROUP_BATCHES * batch
    for start in range(0, len(rows), window):
        part = rows[start:start + window]
        part = part[np.argsort(-lengths[part], kind="stable")]
        chunks = [part[i:i + batch] for i in range(0, len(part), batch)]
        out.extend(chunks[j] for j in rng.permutation(len(chunks)))
    return out


def length_grouped(batches: Iterable[dict[str, np.ndarray]], batch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """A stream of batches (dicts of equal-width numpy arrays with an ``attention_mask``) regrouped
    by length, ``GROUP_BATCHES`` batches at a time (``length_batches``): the same rows, the same
    number of batches, each batch's rows of similar length. Deterministic for a given input
    order and ``seed``."""
    rng = np.random.default_rng(seed)
    window: list[dict[str, np.ndarray]] = []

    def regroup() -> Iterator[dict[str, np.ndarray]]:
        rows = {k: np.concatenate([np.asarray(b[k]) for b in window]) for k in window[0]}
        lengths = rows["attention_mask"].sum(1)
        for idx in length_batches(np.arange(len(lengths)), lengths, batch, rng):
            yield {k: v[idx] for k, v in rows.items()}

    for b in batches:
        window.append(b)
        if len(window) == GROUP_BATCHES:
            yield from regroup()
            window = []
    if window:
        yield from regroup()


class BatchStream:
    """The k-th global batch of a task, as row indices: a pure function of (seed, task, k).

    Each epoch is a fresh seeded permutation cut into ``n // batch`` full batches (the remainder
    is dropped; a task smaller than one batch uses all its rows). Stateless, so a resumed run only
    needs how many batches each task has consumed, and every worker sees the same global batch
    and takes its own slice of it (``rows[rank::world]``). With ``lengths`` (each row's token
    count) the epoch's batches are grouped by length (``length_batches``)."""

    def __init__(self, n_rows: int, batch: int, seed: int, task_id: int, lengths: np.ndarray | None = None):
        self.n, self.batch, self.seed, self.task_id = n_rows, batch, seed, task_id
        self.per_epoch = max(1, n_rows // batch)
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and len(self.lengths) != n_rows:
            raise ValueError(f"lengths has {len(self.lengths)} entries for {n_rows} rows")
        self._cache: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, self.task_id, epoch])
            perm = rng.permutation(self.n)
            if self.lengths is not None and self.n > self.batch:
                used = perm[:self.per_epoch * self.batch]  # full batches only, as without grouping
                perm = np.concatenate(length_batches(used, self.lengths, self.batch, rng))
            self._cache = (epoch, perm)
        return self._cache[1]

    def batch_indices(self, k: int) -> np.ndarray:
        epoch, pos = divmod(k, self.per_epoch)
        return self._perm(epoch)[pos * self.batch:(pos + 1) * self.batch]
