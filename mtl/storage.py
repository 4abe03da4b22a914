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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_remote(path: str | os.PathLike) -> bool:
    """An object-storage (or other non-local) URI; ``file://`` and plain paths are local."""
    s = str(path)
    return "://" in s and not s.startswith("file://") and not s.startswith(MLFLOW_SCHEMES)


def join(base: str, *parts: str) -> str:
    """``base/part/...``, keeping a URI's ``?query`` at the end (a local path's ``?`` is a character)."""
    root, sep, query = str(base).partition("?") if is_remote(base) else (str(base), "", "")
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
    path = str(uri).partition("?")[0] if is_remote(uri) else str(uri)
    return path.rstrip("/").rsplit("/", 1)[-1]


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


def write_text(uri: str, text: str) -> None:
    """Write (or replace) one file; its folder is created as needed."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def list_files(uri: str) -> list[str]:
    """Names of the files directly under ``uri``, sorted (none when ``uri`` does not exist)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def ray_storage(uri: str) -> tuple[str, Any]:
    """(``storage_path``, ``storage_filesystem``) for a Ray Train or Tune ``RunConfig``: a local path
    as it is (Ray's default filesystem), a URI as its path on its pyarrow filesystem."""
    if not is_remote(uri):
        return str(uri), None
    fs, path = filesystem(uri)
    return path, fs


def uri_of(base: str, path: str) -> str:
    """The URI of ``path`` (a path on ``base``'s filesystem, as Ray reports checkpoints) under the
    URI ``base``, with ``base``'s query: the inverse of ``filesystem`` below ``base``."""
    if not is_remote(base):
        return path
    root = filesystem(base)[1].rstrip("/")
    if path.rstrip("/") == root:
        return base
    if not path.startswith(root + "/"):
        raise ValueError(f"{path!r} is not under {name(base)!r} ({root})")
    return join(base, path[len(root) + 1:])


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


@dataclass
class RunFolder:
    """A run's output folder (``output_dir/name/train-<time>``, ``.../sweep-<time>``). With a local
    ``output_dir`` it is ``local``. With a URI (``s3://bucket/runs``) it is ``remote``: Ray writes
    checkpoints and Tune state there from the workers, and the driver writes its files (model,
    reports, summary) to the local staging folder ``local`` and uploads them (``sync``)."""

    local: Path
    remote: str | None = None

    @classmethod
    def staged(cls, remote: str, group: str) -> RunFolder:
        """The folder at the URI ``remote``, staged in ``<temp dir>/mtl-ray-runs/<group>/<its name>``."""
        return cls(Path(tempfile.gettempdir()) / "mtl-ray-runs" / group / name(remote), remote)

    @property
    def name(self) -> str:
        return self.local.name

    @property
    def where(self) -> str:
        """What to show and record: the remote URI, else the local folder."""
        return self.remote or str(self.local)

    def storage(self) -> tuple[str, Any]:
        """(``storage_path``, ``storage_filesystem``) for Ray's RunConfig (``ray_storage``)."""
        return ray_storage(self.where)

    def sync(self) -> None:
        if self.remote is not None:
            upload(self.local, self.remote)

    def fetch(self, filename: str) -> bool:
        """Copy ``filename`` from the remote folder into the staging folder, when it is there."""
        if self.remote is None or not exists(join(self.remote, filename)):
            return False
        self.local.mkdir(parents=True, exist_ok=True)
        (self.local / filename).write_text(read_text(join(self.remote, filename)))
        return True


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
