"""tune/space.py: loss weights on the simplex from raw uniform draws, the search space, ASHA's
budget and the concurrency arithmetic (no Ray cluster needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtl.config import config_from_dict
from tune.space import (
    DRAW_LOW,
    EQUAL_DRAW,
    check_space,
    derive_max_concurrent,
    draw_key,
    equal_weights_config,
    max_t,
    search_space,
    simplex_weights,
    trial_params,
)


def _cfg(n_tasks=3, **space):
    tasks = [{"name": f"t{i}", "kind": "sequence_classification", "source": {"type": "atis", "field": "intent"}}
             for i in range(n_tasks)]
    return config_from_dict({"tasks": tasks, "train": {"num_workers": 2, "batch_size": 8},
                             "tune": {"space": {"lr": [1e-5, 1e-3], **space}}})


def test_weights_are_positive_and_sum_to_the_number_of_tasks():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 5):
        for _ in range(200):
            u = rng.uniform(DRAW_LOW, 1.0, size=k)
            w = simplex_weights(list(u))
            assert len(w) == k and all(x > 0 for x in w)
            assert sum(w) == pytest.approx(k, abs=1e-9)


def test_weights_map_from_the_draws_by_minus_log():
    u = [0.5, 0.25, 0.125]  # -log u = ln2 · (1, 2, 3)
    assert simplex_weights(u) == pytest.approx([0.5, 1.0, 1.5])
    # a mapping keeps task names and follows the requested order
    w = simplex_weights({"b": 0.25, "a": 0.5, "c": 0.125}, ["a", "b", "c"])
    assert list(w) == ["a", "b", "c"] and w == pytest.approx({"a": 0.5, "b": 1.0, "c": 1.5})
    # equal draws are equal weights, λ = 1 each, whatever the draw
    assert simplex_weights([0.3] * 4) == pytest.approx([1.0] * 4)
    assert simplex_weights([EQUAL_DRAW] * 2) == pytest.approx([1.0, 1.0])
    # a smaller draw is a larger weight (monotone), and the mapping is scale-free in -log u
    assert simplex_weights([0.1, 0.9])[0] > 1.0
    assert simplex_weights([0.5, 0.25]) == pytest.approx(simplex_weights([0.25, 0.0625]))
    # u = 1 would be weight 0: kept positive
    assert min(simplex_weights([1.0, 0.5])) > 0
    with pytest.raises(ValueError):
        simplex_weights([0.0, 0.5])
    with pytest.raises(ValueError):
        simplex_weights([])


def test_uniform_draws_give_a_uniform_dirichlet():
    """−log U ~ Exp(1), normalised: Dirichlet(1, …, 1); each λ_i/K has mean 1/K and variance
    (K − 1)/(K²(K + 1))."""
    rng = np.random.default_rng(1)
    k = 3
    w = np.array([simplex_weights(list(rng.uniform(DRAW_LOW, 1.0, size=k))) for _ in range(20000)]) / k
    assert w.mean(0) == pytest.approx([1 / k] * k, abs=0.01)
    assert w.var(0) == pytest.approx([(k - 1) / (k * k * (k + 1))] * k, rel=0.05)


def test_trial_params_decode_a_sampled_config():
    cfg = _cfg(2)
    config = {"lr": 1e-4, draw_key("t0"): 0.5, draw_key("t1"): 0.25, "warmup_ratio": 0.1}
    p = trial_params(config, cfg.task_names)
    assert p["lr"] == 1e-4 and p["warmup_ratio"] == 0.1
    assert p["task_weights"] == pytest.approx({"t0": 2 / 3, "t1": 4 / 3})
    assert "task_weights" not in trial_params({"lr": 1e-4}, cfg.task_names)  # weights from the config
    eq = trial_params(equal_weights_config(config, cfg.task_names), cfg.task_names)
    assert eq["task_weights"] == pytest.approx({"t0": 1.0, "t1": 1.0}) and eq["lr"] == 1e-4
    with pytest.raises(ValueError):
        trial_params({"lr": 1e-4, draw_key("t0"): 0.5}, cfg.task_names)


def test_search_space():
    from ray.tune.search.sample import Categorical, Float

    space = search_space(_cfg(3, batch_size=[8, 16], temperature=[2.0]))
    assert isinstance(space["lr"], Float) and (space["lr"].lower, space["lr"].upper) == (1e-5, 1e-3)
    assert type(space["lr"].sampler).__name__ == "_LogUniform"
    assert {k for k in space if k.startswith("draw_")} == {"draw_t0", "draw_t1", "draw_t2"}
    assert (space["draw_t0"].lower, space["draw_t0"].upper) == (DRAW_LOW, 1.0)
    assert isinstance(space["batch_size"], Categorical) and space["batch_size"].categories == [8, 16]
    assert space["temperature"] == 2.0 and "warmup_ratio" not in space  # one value is a constant
    assert not any(k.startswith("draw_") for k in search_space(_cfg(3, task_weights=False)))
    assert not any(k.startswith("draw_") for k in search_space(_cfg(1)))  # one task: nothing to weigh
    assert search_space(_cfg(2, lr=[3e-4, 3e-4]))["lr"] == 3e-4


def test_check_space_fails_before_ray():
    check_space(_cfg(2, batch_size=[8, 16]))
    with pytest.raises(ValueError, match="batch_size"):
        check_space(_cfg(2, batch_size=[8, 9]))  # 2 workers
    with pytest.raises(ValueError, match="lr"):
        check_space(_cfg(2, lr=[1e-3, 1e-5]))


def test_max_t_counts_evaluations():
    assert max_t(16, 2) == 8
    assert max_t(240, 60) == 4
    assert max_t(250, 60) == 5  # the loop also evaluates at the last step
    assert max_t(10, 100) == 1
    for steps in range(1, 50):
        for every in range(1, 12):
            reports = sum(1 for s in range(1, steps + 1) if s % every == 0 or s == steps)
            assert max_t(steps, every) == reports == math.ceil(steps / every)


def test_concurrency_arithmetic():
    # 4 logical CPUs, one 1-CPU worker + a 0.5-CPU trial each, 1 CPU kept for Ray Data: 2 at a time
    assert derive_max_concurrent(4, 1, 1, 0.5) == 2
    # the quick config: 2 CPUs a worker
    assert derive_max_concurrent(4, 1, 2, 0.5) == 1
    assert derive_max_concurrent(16, 2, 1, 0.5) == 6
    assert derive_max_concurrent(16, 2, 1, 1.0, reserve_cpus=0) == 5  # cpus / (workers × cpus + 1)
    assert derive_max_concurrent(2, 2, 2, 0.5) == 1  # never below 1
    # with GPUs, also bounded by GPUs per trial
    assert derive_max_concurrent(64, 2, 4, 0.5, cluster_gpus=4, use_gpu=True) == 2
    assert derive_max_concurrent(64, 2, 4, 0.5, cluster_gpus=1, use_gpu=True) == 1


def test_the_space_converts_for_optuna():
    pytest.importorskip("optuna")
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from ray.tune.search.optuna import OptunaSearch

    dists = dict(OptunaSearch.convert_search_space(search_space(_cfg(2, warmup_ratio=[0.0, 0.1]))))
    assert set(dists) == {"lr", "draw_t0", "draw_t1", "warmup_ratio"}
    assert isinstance(dists["lr"], FloatDistribution) and dists["lr"].log
    assert isinstance(dists["draw_t1"], FloatDistribution) and not dists["draw_t1"].log
    assert isinstance(dists["warmup_ratio"], CategoricalDistribution)
