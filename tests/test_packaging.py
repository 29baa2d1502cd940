"""The distribution ships every subpackage, and never a bare top-level ``kernels``."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"efficientqat"} | {
        "efficientqat." + p.parent.relative_to(REPO / "efficientqat").as_posix().replace("/", ".")
        for p in (REPO / "efficientqat").rglob("__init__.py") if p.parent != REPO / "efficientqat"
    }
    assert found | {"efficientqat.kernels"} == listed


def test_kernels_install_under_the_project_namespace(tmp_path):
    assert importlib.util.find_spec("efficientqat.kernels") is not None
    # outside the repository (no cwd on sys.path) a bare "kernels" must not resolve to ours
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True).stdout
    assert str(REPO) not in out


def test_a_top_level_kernels_import_from_the_repository_root_is_an_empty_package():
    # transformers imports "kernels" (the hub-kernels package name) to read its version; run from the
    # repository root that finds our folder, which must not load a second copy of the kernel modules
    code = ("import sys, kernels, efficientqat.kernels\n"
            "print(sorted(m for m in sys.modules if m.startswith('kernels')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "['kernels']"
