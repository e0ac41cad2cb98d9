"""The shape of the code: stages depend downward only, one package talks to libvirt, the planner
loads neither libvirt nor jinja2, and nothing but the CLI knows the CLI.

Read from the source (every import statement, at any depth, TYPE_CHECKING ones included) and
checked once more by importing in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kvmctl"

# Lower ranks are imported by higher ones, never the other way round; a rank may import itself.
RANKS = {
    "kvmctl.errors": 0, "kvmctl.kinds": 0, "kvmctl.units": 0, "kvmctl.memo": 0,
    "kvmctl.xmltext": 0, "kvmctl.lazy": 0, "kvmctl.schedule": 0,
    "kvmctl": 0, "kvmctl.__main__": 10,
    "kvmctl.manifest": 1, "kvmctl.source": 1, "kvmctl.render": 2, "kvmctl.host": 3,
    "kvmctl.plan": 4,
    "kvmctl.apply": 5, "kvmctl.engine": 6, "kvmctl.snapshot": 6,
    "kvmctl.backup": 6, "kvmctl.importer": 6, "kvmctl.sync": 7,
    "kvmctl.controller": 8,
    "kvmctl.cli": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    """The entry of RANKS a module belongs to (its package, or itself at the top)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no stage of RANKS: add it")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, relative imports made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            # `from . import apply` imports the module kvmctl.apply
            found.update(f"{target}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / Path(*f"{target}.{alias.name}".split("."))
                             ).with_suffix(".py").exists()
                         or (PACKAGE.parent / Path(*f"{target}.{alias.name}".split("."))
                             ).is_dir())
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): imports(p) for p in SOURCES}


def test_the_stages_are_the_packages() -> None:
    for sub in ("manifest", "render", "host", "plan", "apply", "cli"):
        assert (PACKAGE / sub / "__init__.py").is_file()
    assert {stage(m) for m in GRAPH} <= set(RANKS)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_stages_depend_downward_only(module: str) -> None:
    rank = RANKS[stage(module)]
    upward = sorted(t for t in GRAPH[module] if t.startswith("kvmctl")
                    and RANKS[stage(t)] > rank)
    assert not upward, f"{module} (stage {stage(module)}) imports higher stages: {upward}"


def test_only_the_host_package_imports_libvirt() -> None:
    users = sorted(m for m, targets in GRAPH.items()
                   if any(t == "libvirt" or t.startswith("libvirt.") for t in targets))
    assert all(stage(m) == "kvmctl.host" for m in users), users
    # kvmctl.host.transfer streams volumes through Hypervisor and imports no libvirt itself.
    assert users == ["kvmctl.host.connection", "kvmctl.host.early", "kvmctl.host.hypervisor",
                     "kvmctl.host.leases",
                     "kvmctl.host.reading", "kvmctl.host.snapshots"]


def test_nothing_outside_the_cli_imports_it() -> None:
    users = sorted(m for m, targets in GRAPH.items() if stage(m) not in ("kvmctl.cli",
                                                                          "kvmctl.__main__")
                   and any(t == "kvmctl.cli" or t.startswith("kvmctl.cli.") for t in targets))
    assert users == []


def test_the_planner_imports_no_libvirt_and_no_jinja2() -> None:
    for module, targets in GRAPH.items():
        if stage(module) == "kvmctl.plan":
            banned = sorted(t for t in targets if t.split(".")[0] in ("libvirt", "jinja2", "rich"))
            assert not banned, f"{module} imports {banned}"


def _loaded_by(statement: str) -> set[str]:
    code = (f"import sys\n{statement}\nimport json\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)
    return set(json.loads(done.stdout))


def test_importing_the_planner_loads_no_libvirt_and_no_jinja2() -> None:
    loaded = _loaded_by("import kvmctl.plan, kvmctl.plan.vm, kvmctl.host.state, "
                        "kvmctl.host.facts")
    assert not loaded & {"libvirt", "jinja2", "rich", "jsonschema"}


def test_importing_the_manifest_stage_loads_no_engine() -> None:
    loaded = _loaded_by("import kvmctl.manifest.validate, kvmctl.manifest.checks")
    assert not loaded & {"libvirt", "jinja2", "rich", "lxml"}


def test_only_the_cli_prints() -> None:
    """print() and sys.exit() belong to the CLI; the engine returns values and raises."""
    for path in SOURCES:
        if stage(module_name(path)) in ("kvmctl.cli", "kvmctl.__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("print", "sys.exit", "exit", "sys.stdout.write",
                                    "sys.stderr.write"), f"{path}:{node.lineno}: {name}"
