"""The rooms' dependency rules, checked on the source: every module's imports are parsed with
``ast`` (module level and inside functions alike) and resolved to ``tensorslm`` modules
through the package-dir mapping of pyproject.toml.

- ``rank_store`` and ``controller`` import no other room (and never ``agent``, ``fleet`` or
  the command line);
- ``fleet`` uses only the wire contract of ``agent``, directly or through what it imports;
- nothing outside ``tensorslm.cli`` (library or benchmark) imports ``tensorslm.cli``;
- no module, test or benchmark imports a bare ``agent``/``controller``/``rank_store``/``fleet``.
"""
from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:                                           # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("rank_store", "controller", "agent", "fleet", "cli")
BARE = ("agent", "controller", "rank_store", "fleet")
WIRE_CONTRACT = {f"tensorslm.agent.{name}" for name in (
    "protocol", "topics", "broker_config", "client", "record_schema", "systemd_notify", "errors")}


def _package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {package: ROOT / folder
            for package, folder in config["tool"]["setuptools"]["package-dir"].items()}


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every library module by its import name (``tensorslm.agent.daemon``: agent/daemon.py)."""
    found: dict[str, Path] = {}
    dirs = _package_dirs()
    for package, folder in dirs.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    # subpackages that are folders of a mapped package without their own mapping
    for package, folder in dirs.items():
        for sub in folder.iterdir():
            child = f"{package}.{sub.name}"
            if sub.is_dir() and (sub / "__init__.py").exists() and child not in dirs:
                for path in sub.glob("*.py"):
                    found[child if path.stem == "__init__" else f"{child}.{path.stem}"] = path
    return found


def imported_names(path: Path, module: str | None) -> set[str]:
    """The absolute names ``path`` imports (``from x import y`` gives ``x`` and ``x.y``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = None
    if module is not None:
        package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if package is None:
                    continue
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def internal_imports(module: str) -> set[str]:
    """The tensorslm modules ``module`` imports."""
    known = modules()
    return {name for name in imported_names(known[module], module) if name in known}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(internal_imports(module) - seen)
    return seen


def test_the_walk_finds_the_rooms_and_their_imports():
    """The checks below are only as good as the walk: it must see modules and edges we know."""
    known = modules()
    for name in ("tensorslm.agent.daemon", "tensorslm.controller.decision.control_loop",
                 "tensorslm.controller.power.energy_meter", "tensorslm.rank_store.embedding",
                 "tensorslm.fleet.collector", "tensorslm.cli.demo", "tensorslm.errors"):
        assert name in known, name
    assert "tensorslm.agent.broker_config" in internal_imports("tensorslm.fleet.collector")
    assert "tensorslm.agent.protocol" in internal_imports("tensorslm.agent.daemon")  # relative


def test_imports_are_resolved_as_python_would(tmp_path):
    """Relative imports resolve against the module's package, imports inside functions count."""
    source = tmp_path / "loop.py"
    source.write_text("from . import policy\nfrom ..power.readings import Method\n"
                      "def f():\n    from tensorslm.agent import daemon\n    import fleet\n")
    names = imported_names(source, "tensorslm.controller.decision.loop")
    assert {"tensorslm.controller.decision.policy", "tensorslm.controller.power.readings.Method",
            "tensorslm.agent.daemon", "fleet"} <= names


@pytest.mark.parametrize("inner", ["rank_store", "controller"])
def test_rank_store_and_controller_import_no_other_room(inner):
    offending = {(module, name) for module in modules() if room(module) == inner
                 for name in internal_imports(module)
                 if room(name) is not None and room(name) != inner}
    assert not offending, f"{inner} must import no other room; found {sorted(offending)}"


def test_fleet_uses_only_the_wire_contract_of_agent():
    fleet = {module for module in modules() if room(module) == "fleet"}
    reached = closure(fleet)
    outside = sorted(name for name in reached
                     if room(name) == "agent" and name not in WIRE_CONTRACT
                     and name != "tensorslm.agent")
    assert not outside, f"fleet reaches agent modules outside the wire contract: {outside}"
    others = sorted(name for name in reached if room(name) in ("rank_store", "cli"))
    assert not others, f"fleet reaches {others}"


def test_nothing_imports_the_command_line():
    entry_points = {"tensorslm.__main__"}          # ``python -m tensorslm`` runs the CLI
    offending = sorted((module, name) for module in modules()
                       if room(module) != "cli" and module not in entry_points
                       for name in internal_imports(module) if room(name) == "cli")
    offending += sorted((str(path.relative_to(ROOT)), name)
                        for path in (ROOT / "bench").glob("*.py")
                        for name in imported_names(path, None) if room(name) == "cli")
    assert not offending, f"only tensorslm.cli may import tensorslm.cli; found {offending}"


def test_no_module_imports_a_bare_room_name():
    files = [(path, module) for module, path in modules().items()]
    files += [(path, None) for folder in ("tests", "bench") for path in (ROOT / folder).glob("*.py")]
    offending = sorted(f"{path.relative_to(ROOT)}: {name}" for path, module in files
                       for name in imported_names(path, module)
                       if name.split(".")[0] in BARE)
    assert not offending, f"import through tensorslm.<room>, never bare: {offending}"


def test_the_central_side_and_the_wire_contract_import_without_torch():
    """A central machine installs no model stack: fleet and agent's wire contract import with
    torch, transformers and gguf made unimportable."""
    import subprocess

    modules_to_import = sorted(name for name in modules() if room(name) == "fleet")
    modules_to_import += sorted(WIRE_CONTRACT)
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'gguf'):\n"
        "            raise ImportError('not on a central machine: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        + "".join(f"import {name}\n" for name in modules_to_import))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
