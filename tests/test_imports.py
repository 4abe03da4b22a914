"""The project's packages resolve to the repository's own code under pytest.

tests/mtl, tests/serve, ... hold no __init__.py and pytest puts tests/ on sys.path, so a fresh
`import mtl` (MLflow re-imports a model's code_paths this way) could resolve to the tests/mtl
namespace, with mtl.__file__ None. CI failed on exactly that; `pythonpath = ["."]` fixes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["mtl", "pipelines", "tune", "serve", "benchmarks"])
def test_a_fresh_import_finds_the_repository_package(name):
    # a new interpreter with this session's sys.path (as collection left it), in its order: what a
    # re-import would find
    from conftest import SESSION_SYS_PATH

    assert SESSION_SYS_PATH
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in SESSION_SYS_PATH)}
    out = subprocess.run(
        [sys.executable, "-c", f"import {name}; print({name}.__file__)"],
        env=env, cwd="/", capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == str(ROOT / name / "__init__.py")
