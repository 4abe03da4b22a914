"""Starting or joining Ray with the settings that keep a laptop run on loopback and quiet."""

from __future__ import annotations

import os

from mtl.config import HAPROXY_ENV

# Keep a local Ray on 127.0.0.1, send no usage stats, and no progress-bar floods.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def set_ray_env() -> None:
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)




def runtime_env() -> dict:
    """Environment variables every Ray worker, trial and replica gets."""
    env = {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}
    # Ray Serve's ingress mode (serve.app.ingress_env): passed on to Ray's processes when set here
    env.update({k: os.environ[k] for k in HAPROXY_ENV if k in os.environ})
    return {"env_vars": env}


class ResourceError(RuntimeError):
    """The cluster cannot hold a run's workers and its data pipeline at once."""


def required_cpus(cfg, trials: int = 1, per_trial: float = 0.0) -> float:
    """Logical CPUs a run needs at once: ``trials`` × (its training workers' CPUs + ``per_trial``,
    e.g. a Tune trial's own CPU) + ``data.cpus`` kept free for Ray Data's tasks."""
    tc = cfg.train
    return trials * (tc.num_workers * tc.cpus_per_worker + per_trial) + cfg.data.cpus


def check_resources(cfg, trials: int = 1, per_trial: float = 0.0) -> None:
    """Refuse at once, naming the settings, a run the connected cluster cannot hold: its workers
    would take every CPU and Ray Data's read/tokenize tasks would wait forever (a hang, not an error)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    need = required_cpus(cfg, trials, per_trial)
    if need > total + 1e-9:
        tc = cfg.train
        trial_part = f"{trials} concurrent trial(s) × (" if trials > 1 or per_trial else "("
        raise ResourceError(
            f"this run needs {need:g} CPUs at once: {trial_part}train.num_workers {tc.num_workers} × "
            f"train.cpus_per_worker {tc.cpus_per_worker:g}{f' + {per_trial:g} per trial' if per_trial else ''}) "
            f"+ data.cpus {cfg.data.cpus:g} for Ray Data, but the Ray cluster has {total:g}. Lower "
            "train.cpus_per_worker or train.num_workers (or tune.max_concurrent), or add nodes; "
            "otherwise the workers take every CPU and the data pipeline can never run.")


def init_ray(address: str | None = None, num_cpus: int | None = None, min_cpus: float = 0.0, **kwargs):
    """Join ``address`` (or ``RAY_ADDRESS``, or the cluster a ``ray job submit`` runs in), else
    (none, or ``local``) start a local Ray on loopback. Locally, CPUs are oversubscribed to at
    least 4 logical ones, and to ``min_cpus`` (a run's ``required_cpus``), so Ray Data's tasks can
    run beside the training workers (on 2 physical cores a 2-worker fit otherwise starves)."""
    set_ray_env()
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env(), **kwargs)
        return ray
    cpus = num_cpus or local_cpus(min_cpus)
    # address="local": always a new local Ray, never a `ray start` cluster that happens to run on
    # this machine (join one with RAY_ADDRESS / --address, as `ray job submit` does)
    ray.init(address="local", num_cpus=cpus, object_store_memory=kwargs.pop("object_store_memory", 1 << 30),
             include_dashboard=kwargs.pop("include_dashboard", True), dashboard_host="127.0.0.1",
             runtime_env=runtime_env(), log_to_driver=kwargs.pop("log_to_driver", True), **kwargs)
    return ray


def local_cpus(min_cpus: float = 0.0) -> int:
    """Logical CPUs of a local Ray: the machine's, at least 4, at least ``min_cpus`` (rounded up)."""
    import math

    return max(4, os.cpu_count() or 1, math.ceil(min_cpus))


def resolve_use_gpu(cfg) -> bool:
    """``train.use_gpu: auto`` -> GPUs when the connected cluster has any."""
    if cfg.train.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.train.use_gpu)
