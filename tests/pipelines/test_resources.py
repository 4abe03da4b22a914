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
