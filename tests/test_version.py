"""``jaxcnn --version`` and ``jaxcnn.__version__``: the installed distribution's version, one line; the package
metadata in pyproject.toml without deprecated fields."""

import importlib
import importlib.metadata
import pathlib
import re
import tomllib

import pytest

import jaxcnn
from jaxcnn import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEP440 = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9.]+)?")


def test_version_is_the_installed_distributions():
    assert jaxcnn.__version__ == importlib.metadata.version("jaxcnn")
    assert PEP440.fullmatch(jaxcnn.__version__), jaxcnn.__version__


def test_version_flag_prints_one_line_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"jaxcnn {jaxcnn.__version__}\n"


def test_version_of_a_source_tree_that_was_never_installed(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    try:
        assert importlib.reload(jaxcnn).__version__ == "0+unknown"
    finally:
        monkeypatch.undo()
        importlib.reload(jaxcnn)
    assert jaxcnn.__version__ == importlib.metadata.version("jaxcnn")


def test_pyproject_metadata():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert PEP440.fullmatch(project["version"])
    # an SPDX expression: the license table is deprecated (setuptools warns from 77 on, which reads the string)
    assert project["license"] == "Apache-2.0"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
