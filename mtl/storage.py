"""Paths that may be local or in object storage (``s3://``, ``gs://``, ``abfs://``: any filesystem
pyarrow knows), for run folders and model artifacts. No Ray import.

A URI may carry pyarrow's options as a query, which stays at the end when parts are joined:

    join("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http", "quick", "train-1")
    -> "s3://bucket/runs/quick/train-1?endpoint_override=127.0.0.1:9000&scheme=http"
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_remote(path: str | os.PathLike) -> bool:
    """An object-storage (or other non-local) URI; ``file://`` and plain paths are local."""
    s = str(path)
    return "://" in s and not s.startswith("file://") and not s.startswith(MLFLOW_SCHEMES)


def join(base: str, *parts: str) -> str:
    """``base/part/...``, keeping a URI's ``?query`` at the end."""
    root, sep, query = str(base).partition("?")
    joined = "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return joined + (sep + query if sep else "")


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a URI or a local path."""
    from pyarrow import fs

    if not is_remote(uri):
        return fs.LocalFileSystem(), str(Path(str(uri).removeprefix("file://")).resolve())
    return fs.FileSystem.from_uri(uri)


def name(uri: str) -> str:
    """The last part of a path or URI (``train-...`` of a run folder)."""
    return str(uri).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def list_dirs(uri: str, prefix: str = "") -> list[str]:
    """Names of the folders directly under ``uri`` that start with ``prefix``, sorted (none when
    ``uri`` does not exist)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))


def exists(uri: str) -> bool:
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def upload(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (created as needed; existing files replaced)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy everything under ``uri`` into ``local_dir``; returns it."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def local_copy(uri: str, cache: str | os.PathLike | None = None) -> Path:
    """A local copy of a remote folder (an artifact), fetched once per URI into ``cache``
    (``$MTL_RAY_CACHE`` or the temp dir); a partial download is never reused."""
    root = Path(cache or os.environ.get("MTL_RAY_CACHE") or Path(tempfile.gettempdir()) / "mtl-ray-cache")
    dest = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="fetch-", dir=root))
    download(uri, staging)
    (staging / ".complete").write_text(uri)
    try:
        staging.rename(dest)
    except OSError:  # another process fetched it first
        pass
    return dest
