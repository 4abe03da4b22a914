"""Two Ray nodes on one machine (two raylets): 2-worker DDP, one worker per node, each worker
streaming its own shard of every task. Runs in a subprocess (two_nodes.py) because the rest of the
session shares one single-node Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Opt-in (``pytest --run-extended``; .ci/run runs it after the suite): a second Ray cluster of two
# raylets and a 2-worker fit cost a minute or more on 2 cores, beyond the suite's 15-minute budget.
pytestmark = [pytest.mark.slow, pytest.mark.extended]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_nodes")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(HERE / "two_nodes.py"), str(out)], env=env, cwd=HERE.parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), out


def test_one_worker_on_each_node(two_nodes):
    result, _ = two_nodes
    assert len(result["nodes"]) == 2
    assert sorted(result["worker_nodes"]) == result["nodes"]


def test_the_nodes_trained_on_disjoint_shards_that_cover_each_split(two_nodes):
    from test_train import check_shards_cover_the_split, epoch_rows

    result, out = two_nodes
    for task in ("sentiment", "cities"):
        check_shards_cover_the_split(epoch_rows(out / "rows", task), result["train_ids"][task])


def test_two_node_run_learns(two_nodes):
    result, _ = two_nodes
    assert result["steps"] == 60
    hist = result["history"]
    for task in ("sentiment", "cities"):
        assert hist[-1][f"train/loss/{task}"] < 0.7 * hist[0][f"train/loss/{task}"], task
    assert result["test_metrics"]["sentiment"]["accuracy"] >= 0.9
    assert result["test_metrics"]["cities"]["f1"] >= 0.8
