"""Each package's version is written once (hatchling reads it from the file its
pyproject names), and the three move in lockstep: the psik-api-core pins follow it."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "psik-api-core": "psik_api_core",
    "psik-api-server": "psik_api_server",
    "psik-api-client": "psik_api_client",
}


def _pyproject(name: str) -> dict[str, Any]:
    with (ROOT / "packages" / name / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _written_version(path: Path) -> str:
    """The string literal assigned to ``__version__`` in ``path`` (what hatchling reads)."""
    found = [
        node.value.value
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert len(found) == 1, f"{path} must assign __version__ one string literal"
    return found[0]


@pytest.mark.parametrize(("name", "module"), PACKAGES.items())
def test_version_is_written_once(name: str, module: str) -> None:
    pyproject = _pyproject(name)
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    source = ROOT / "packages" / name / pyproject["tool"]["hatch"]["version"]["path"]
    written = _written_version(source)
    assert written == importlib.metadata.version(name)
    assert importlib.import_module(module).__version__ == written


def test_versions_move_in_lockstep() -> None:
    versions = {name: importlib.metadata.version(name) for name in PACKAGES}
    assert len(set(versions.values())) == 1, versions
    core = versions["psik-api-core"]
    for name in ("psik-api-server", "psik-api-client"):
        pins = [
            Requirement(dep)
            for dep in _pyproject(name)["project"]["dependencies"]
            if Requirement(dep).name == "psik-api-core"
        ]
        assert [str(pin.specifier) for pin in pins] == [f"=={core}"], name
