"""Find a model artifact from what a user types: a directory, or an MLflow URI.

    local_artifact("runs/quick/model")                      # an artifact directory
    local_artifact("models:/mtl-ray-quick@champion")        # the registry (alias or version)
    local_artifact("runs:/<run_id>/model")                  # a run's logged model
"""

from __future__ import annotations

from pathlib import Path

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
    """A local artifact directory for ``model`` (downloading from MLflow when it is a URI)."""
    if "://" not in model and not model.startswith(("models:/", "runs:/")):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model {model!r}: no such directory (or use models:/<name>@<alias>)")
        return find_manifest_dir(path)
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=dst)
    return find_manifest_dir(Path(local))
