"""The sweep's search space and its arithmetic (no Ray at import time; Ray Tune only inside
``search_space``).

Per-task loss weights live on the simplex, scaled to sum to the number of tasks K (so λ = 1 for
every task is the centre, "equal weights"). Tune samples one raw draw per task,
``draw_<task> ~ U(ε, 1)``; the trial turns them into weights with

    λ_i = K · (−log u_i) / Σ_j (−log u_j)

−log U is Exp(1), and K independent Exp(1) normalised by their sum are Dirichlet(1, …, 1), i.e.
uniform on the simplex. The raw draws are plain independent uniforms, so the same space works for
random search (Tune's ``BasicVariantGenerator``) and for Optuna's TPE, which models each draw on its
own. Equal draws give equal weights (λ_i = 1); the mapping is scale-free in −log u, so TPE sees K
dimensions for K − 1 degrees of freedom (harmless: any point maps to one weight vector).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DRAW_PREFIX = "draw_"
DRAW_LOW = 1e-6  # keeps −log u finite
EQUAL_DRAW = math.exp(-1.0)  # −log u = 1 for every task: λ_i = 1
OPTIONAL = ("warmup_ratio", "batch_size", "temperature")


def draw_key(task: str) -> str:
    return f"{DRAW_PREFIX}{task}"


def simplex_weights(draws: Mapping[str, float] | Sequence[float], tasks: Sequence[str] | None = None
                    ) -> dict[str, float] | list[float]:
    """Raw uniform draws -> loss weights, positive and summing to the number of tasks.

    ``draws`` is either a mapping task -> u (returns task -> λ, in ``tasks`` order when given) or a
    sequence of u (returns a list)."""
    if isinstance(draws, Mapping):
        names = list(tasks) if tasks is not None else list(draws)
        values = simplex_weights([draws[t] for t in names])
        return dict(zip(names, values))
    us = [float(u) for u in draws]
    if not us:
        raise ValueError("no draws")
    for u in us:
        if not 0.0 < u <= 1.0:
            raise ValueError(f"a weight draw must be in (0, 1], got {u}")
    e = [max(-math.log(u), 1e-12) for u in us]  # u = 1 would give weight 0; keep it positive
    total = sum(e)
    k = len(us)
    return [k * x / total for x in e]


def search_space(cfg) -> dict[str, Any]:
    """Tune's ``param_space`` for ``cfg.tune.space``: lr log-uniform, one uniform draw per task for
    the weights (when ``task_weights`` and more than one task), and choices for the optional knobs."""
    from ray import tune as ray_tune

    space_spec = cfg.tune.space
    lo, hi = (float(x) for x in space_spec.lr)
    if lo > hi:
        raise ValueError(f"tune.space.lr: lower bound {lo} is above the upper bound {hi}")
    space: dict[str, Any] = {"lr": lo if lo == hi else ray_tune.loguniform(lo, hi)}
    if space_spec.task_weights and len(cfg.tasks) > 1:
        for t in cfg.task_names:
            space[draw_key(t)] = ray_tune.uniform(DRAW_LOW, 1.0)
    for name in OPTIONAL:
        values = getattr(space_spec, name)
        if values:
            space[name] = values[0] if len(values) == 1 else ray_tune.choice(list(values))
    return space


def check_space(cfg) -> None:
    """Fail before Ray on a space the trainer cannot run (the config gate's ``tune.space`` rules,
    again for a config changed in code)."""
    from mtl.config import check_config

    check_config(cfg)


def trial_params(config: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """A trial's sampled config -> what the training loop takes (``lr``, ``task_weights``, and the
    optional knobs present in the config)."""
    out: dict[str, Any] = {"lr": float(config["lr"])}
    draws = {t: config[draw_key(t)] for t in tasks if draw_key(t) in config}
    if draws:
        if len(draws) != len(tasks):
            raise ValueError(f"weight draws for {sorted(draws)}, but the tasks are {list(tasks)}")
        out["task_weights"] = simplex_weights(draws, tasks)
    for name in OPTIONAL:
        if name in config:
            out[name] = config[name]
    return out


def equal_weights_config(config: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """``config`` with every task's draw set so that λ = 1 for all tasks (other values kept)."""
    out = dict(config)
    for t in tasks:
        out[draw_key(t)] = EQUAL_DRAW
    return out


def max_t(max_steps: int, eval_every: int) -> int:
    """Evaluations (= Tune iterations) in a full run: one every ``eval_every`` steps and one at the end."""
    return max(1, math.ceil(max_steps / eval_every))


def derive_max_concurrent(cluster_cpus: float, num_workers: int, cpus_per_worker: float,
                          trial_cpus: float, cluster_gpus: float = 0.0, use_gpu: bool = False,
                          reserve_cpus: float = 1.0) -> int:
    """Trials that fit at once: each needs ``num_workers × cpus_per_worker`` CPUs for its training
    workers and ``trial_cpus`` for the trial itself (it only drives the fit); ``reserve_cpus`` stay
    free for Ray Data's tokenizing tasks, which a trial's workers wait on (with none free they hang).
    With GPUs, also at most ``cluster_gpus // num_workers``. Always at least 1."""
    per_trial = num_workers * cpus_per_worker + trial_cpus
    n = int(max(0.0, cluster_cpus - reserve_cpus) // per_trial)
    if use_gpu:
        n = min(n, int(cluster_gpus // num_workers))
    return max(1, n)
