"""Run by test_two_nodes.py in its own interpreter (the test session shares one local Ray):
a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, two raylets), and a
2-worker DDP fit of the synthetic tasks with one worker per node, each streaming its own shard.

    python two_nodes.py OUT_DIR      # writes OUT_DIR/result.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: Path) -> None:
    import faults
    from conftest import build_tiny_encoder
    from ray import cloudpickle
    from ray.cluster_utils import Cluster
    from test_train import make_config, write_synthetic

    from pipelines.ray_utils import init_ray, set_ray_env
    from pipelines.train import run_training

    set_ray_env()
    csv_path, conll_path = write_synthetic(out)
    encoder = build_tiny_encoder(out / "encoder", seed=0, dropout=0.0)
    # the test session's own Ray may hold the default dashboard port
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 1 << 29,
                                                             "include_dashboard": True, "dashboard_port": free_port()})
    cluster.add_node(num_cpus=2, object_store_memory=1 << 29)
    ray = init_ray(address=cluster.address, log_to_driver=False)
    try:
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        cloudpickle.register_pickle_by_value(faults)
        (out / "rows").mkdir()
        cfg = make_config((out, csv_path, conll_path, encoder), out, placement_strategy="STRICT_SPREAD")
        summary = run_training(cfg, callbacks=[faults.RecordRows(str(out / "rows")), faults.RecordNode(str(out))])
        from pipelines.data import read_tasks

        data = read_tasks(cfg)
        result = {"train_ids": {t: [r["idx"] for r in d.rows("train")] for t, d in data.items()},
                  "nodes": nodes, "worker_nodes": [(out / f"node{r}.txt").read_text() for r in (0, 1)],
                  "test_metrics": summary.test_metrics, "steps": summary.steps,
                  "history": summary.history}
        (out / "result.json").write_text(json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
