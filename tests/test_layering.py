"""The layering rule of docs/design.md, enforced on the source tree.

cli -> stunturn.aio -> stunturn.{server,turn,nat,ice} -> stunturn.stun. Only stunturn.aio opens
sockets or reads the clock; only cli/ imports click.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_PACKAGES = ["stun", "server", "turn", "nat", "ice", "auth"]
IO_MODULES = {"asyncio", "time", "selectors", "threading", "uvloop", "asyncio_dgram", "click"}


def _imports(path: Path) -> set[str]:
    """Absolute names of every module imported by ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / "stunturn" / package).rglob("*.py"))


@pytest.mark.parametrize("package", CORE_PACKAGES)
def test_core_packages_do_no_io(package: str) -> None:
    """Sans-IO packages import neither asyncio, clocks, threads nor click, nor the aio layer."""
    for path in _files(package):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in IO_MODULES, f"{path.relative_to(ROOT)} imports {name}"
            assert not name.startswith("stunturn.aio"), f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("package", CORE_PACKAGES)
def test_core_packages_open_no_sockets(package: str) -> None:
    """No socket is created in the sans-IO packages (address helpers like inet_pton are fine)."""
    for path in _files(package):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("socket", "create_connection"):
                value = node.value
                assert not (isinstance(value, ast.Name) and value.id == "socket"), (
                    f"{path.relative_to(ROOT)}:{node.lineno} creates a socket"
                )


def test_codec_depends_on_nothing_above_it() -> None:
    """stunturn.stun imports no other stunturn package."""
    for path in _files("stun"):
        for name in _imports(path):
            if name.startswith("stunturn."):
                assert name.startswith("stunturn.stun"), f"{path.relative_to(ROOT)} imports {name}"


def test_only_cli_imports_click() -> None:
    """The library never imports click."""
    for path in sorted((ROOT / "stunturn").rglob("*.py")):
        assert "click" not in {n.split(".")[0] for n in _imports(path)}, path


def test_every_package_is_in_the_wheel() -> None:
    """pyproject.toml lists every package under stunturn/ (a missing one breaks `pip install .`)."""
    import tomllib  # noqa: PLC0415

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stunturn").rglob("__init__.py")
    }
    assert found <= listed, f"missing from pyproject.toml: {sorted(found - listed)}"
