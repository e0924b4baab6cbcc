"""Every third-party module the production code imports comes from a distribution declared in
`[project].dependencies`: not only a dev dependency, not only a dependency of a dependency."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import distributions
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = ("shared", "services")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalise(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def imported() -> dict[str, set[str]]:
    """Third-party module -> the production files importing it (top-level and lazy imports);
    `from a import b` is recorded as `a.b` (b may be a module of a namespace package)."""
    found: dict[str, set[str]] = {}
    for package in OWN:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN:
                        found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def owners() -> dict[Path, str]:
    """Installed file -> the distribution that installed it."""
    index: dict[Path, str] = {}
    for dist in distributions():
        for file in dist.files or []:
            index[Path(str(dist.locate_file(file))).resolve()] = _normalise(dist.metadata["Name"])
    return index


def origin(name: str) -> Path | None:
    """The file `name` is loaded from: the module itself, else (a name defined in a module)
    its parent."""
    for candidate in (name, name.rpartition(".")[0]):
        try:
            spec = find_spec(candidate) if candidate else None
        except ModuleNotFoundError:
            continue
        if spec is not None and spec.origin not in (None, "namespace"):
            return Path(str(spec.origin)).resolve()
    return None


def test_production_imports_are_declared_dependencies() -> None:
    wanted = declared()
    files = owners()
    undeclared: list[str] = []
    for module, importers in sorted(imported().items()):
        where = origin(module)
        assert where is not None, f"{module} (imported by {sorted(importers)}) is not installed"
        owner = files.get(where)
        assert owner is not None, f"no installed distribution owns {module} ({where})"
        if owner not in wanted:
            undeclared.append(f"{module} from {owner}, imported by {', '.join(sorted(importers))}")
    assert not undeclared, "declare these in [project].dependencies (`uv add ...`):\n" + "\n".join(undeclared)
