"""Find a model artifact from what a user types: a directory, or an MLflow URI.

    local_artifact("runs/quick/model")                      # an artifact directory
    local_artifact("models:/mtl-ray-quick@champion")        # the registry (alias or version)
    local_artifact("runs:/<run_id>/model")                  # a run's logged model
    local_artifact("s3://bucket/runs/quick/train-x/model")  # object storage (any pyarrow filesystem)
    registry_version("models:/mtl-ray-quick@champion", uri)  # the version the alias points at now
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")

MANIFEST = "manifest.json"


def find_manifest_dir(root: Path) -> Path:
    """The folder under ``root`` (itself included) that holds ``manifest.json``."""
    if (root / MANIFEST).is_file():
        return root
    found = sorted(root.rglob(MANIFEST), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"no mtl-ray artifact ({MANIFEST}) under {root}")
    return found[0].parent


def local_artifact(model: str, tracking_uri: str | None = None, dst: str | None = None) -> Path:
    """A local artifact directory for ``model`` (downloading from MLflow for models:/ and runs:/, or
    from object storage for ``s3://``, ``gs://`` and other pyarrow filesystems)."""
    from mtl import storage

    if storage.is_remote(model):
        return find_manifest_dir(storage.local_copy(model, dst))
    if "://" not in model and not model.startswith(("models:/", "runs:/")):
        # absolute: the path travels to Ray workers and Serve replicas, whose working directory
        # is not the caller's (a relative --base made add-task's workers look in the wrong place)
        path = Path(model).absolute()
        if not path.exists():
            raise FileNotFoundError(f"model {model!r}: no such directory (or use models:/<name>@<alias>)")
        return find_manifest_dir(path)
    import mlflow

    with _mlflow_uris(tracking_uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=dst)
    return find_manifest_dir(Path(local))


@contextlib.contextmanager
def _mlflow_uris(uri: str | None):
    """MLflow's tracking and registry URIs set to ``uri`` for the block, then put back as they were
    (the variables and their ``MLFLOW_*_URI`` copies in the environment). MLflow 3 resolves a ``models:/`` URI against its
    process-wide registry URI only (``download_artifacts(registry_uri=...)`` does not reach that
    lookup); setting it for good, as this module used to, re-pointed every later lookup in the
    process: a test's registry check read another test's database."""
    if not uri:
        yield
        return
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # MLflow mirrors both into the environment
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[:2]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def alias_of(model: str) -> tuple[str, str] | None:
    """(name, alias) of a ``models:/<name>@<alias>`` URI, else None."""
    m = _ALIAS.match(model)
    return (m["name"], m["alias"]) if m else None


def registry_version(model: str, tracking_uri: str | None = None) -> str | None:
    """The registered version ``model`` names now: the alias's target for ``models:/<name>@<alias>``,
    the number for ``models:/<name>/<n>``, None for a directory or a run's model."""
    m = _VERSION.match(model)
    if m:
        return m["version"]
    named = alias_of(model)
    if named is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return str(client.get_model_version_by_alias(*named).version)


def pinned(model: str, version: str | None) -> str:
    """``models:/<name>/<version>`` for an alias URI and its resolved version (so a download made
    now and one made later fetch the same files), else ``model`` unchanged."""
    named = alias_of(model)
    return f"models:/{named[0]}/{version}" if named and version else model
