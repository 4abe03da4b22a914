"""CPU accounting for a run (pure logic; the refusal on a real Ray is in test_train.py)."""

from __future__ import annotations

import os

from conftest import QUICK_CONFIG

from mtl.config import load_config
from pipelines.ray_utils import local_cpus, required_cpus


def test_a_run_needs_its_workers_cpus_plus_the_data_share():
    cfg = load_config(QUICK_CONFIG, ["train.num_workers=2", "train.strategy=fsdp"])
    assert (cfg.train.cpus_per_worker, cfg.data.cpus) == (2, 1)
    assert required_cpus(cfg) == 5  # the README's 2-worker command: 2 × 2 + 1
    assert required_cpus(cfg, trials=2, per_trial=1) == 2 * (4 + 1) + 1


def test_a_local_ray_gets_enough_logical_cpus_for_the_run():
    machine = max(4, os.cpu_count() or 1)
    assert local_cpus() == machine
    assert local_cpus(machine + 0.5) == machine + 1


def test_a_sweep_whose_concurrent_trials_cannot_fit_is_refused_before_it_starts(ray_session, tmp_path):
    """3 concurrent trials × (1 worker × 1 CPU + 0.5 for the trial) + 1 for data = 5.5 CPUs on the
    tests' 4-CPU Ray: Tune would start all three and their data would wait forever."""
    import pytest

    from pipelines.ray_utils import ResourceError
    from pipelines.tuning import run_tune

    cfg = load_config(QUICK_CONFIG, ["train.cpus_per_worker=1", "tune.max_concurrent=3",
                                     f"output_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    with pytest.raises(ResourceError, match=r"needs 5.5 CPUs at once: 3 concurrent trial\(s\)") as err:
        run_tune(cfg)
    assert "tune.max_concurrent" in str(err.value)
    assert not list(tmp_path.glob("*/sweep-*")), "no sweep was started"
