"""The package layering of scripts/: every import stays within its package or goes down to a package its
``__init__`` docstring allows ("May import: ..."), and no modules import each other in a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def allowed_imports(root: Path) -> dict[str, set[str]]:
    """Package name -> packages it may import, read off each ``<package>/__init__.py`` docstring."""
    allowed = {}
    for init in sorted(root.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        match = re.search(r"May import:\s*(.*?)\.?\s*$", doc, re.S)
        if match is None:
            raise AssertionError(f"{init}: the docstring says neither what lives there nor 'May import: ...'")
        allowed[init.parent.name] = set(re.findall(r"scripts\.(\w+)", match.group(1)))
    return allowed


def module_imports(root: Path) -> dict[str, set[str]]:
    """Module (``scripts.pkg.mod``) -> the ``scripts`` modules it imports anywhere in its body (lazy ones too)."""
    modules = {
        ".".join((root.name, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for imported in names:
                if imported.split(".")[0] != root.name:
                    continue
                # the longest prefix that is a module: "scripts.data.image_io.load_pair" -> "scripts.data.image_io"
                while imported not in modules and "." in imported:
                    imported = imported.rsplit(".", 1)[0]
                if imported in modules and imported != name:
                    targets.add(imported)
        graph[name] = targets
    return graph


def layer_violations(root: Path) -> list[str]:
    """Imports that go to a package the importer's ``__init__`` does not allow, and modules outside any package."""
    allowed = allowed_imports(root)
    problems = []
    packages = {root.name, *(f"{root.name}.{name}" for name in allowed)}
    for module, targets in module_imports(root).items():
        parts = module.split(".")
        if len(parts) == 2 and module not in packages:
            problems.append(f"{module}: a module outside the packages")
            continue
        package = parts[1] if len(parts) > 1 else None
        for target in sorted(targets):
            target_package = target.split(".")[1] if target.count(".") else None
            if package is None or target_package in (None, package):
                continue
            if target_package not in allowed.get(package, set()):
                problems.append(f"{module} imports {target}: scripts.{package} may not import scripts.{target_package}")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles of the module import graph (each found once, as a path that returns to its start)."""
    graph = module_imports(root)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_every_package_declares_what_it_may_import():
    allowed = allowed_imports(SCRIPTS)
    assert {"utils", "networks", "data", "inferers", "engines", "registration", "evaluation"} <= set(allowed)
    assert allowed["utils"] == set()
    # the declared layers themselves form an order: no two packages may import each other
    for package, targets in allowed.items():
        for target in targets:
            assert package not in allowed.get(target, set()), f"{package} and {target} may import each other"


def test_no_import_goes_up_a_layer():
    assert layer_violations(SCRIPTS) == []


def test_no_import_cycles():
    assert import_cycles(SCRIPTS) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.fixture()
def bad_tree(tmp_path):
    """A small ``scripts`` tree with an upward import, a cycle (through a lazy import) and a loose module."""
    root = tmp_path / "scripts"
    _write(
        root,
        {
            "__init__.py": '"""top"""\n',
            "low/__init__.py": '"""Low.\n\nMay import: nothing of scripts."""\n',
            "low/a.py": "def f():\n    from scripts.high.b import g\n",
            "high/__init__.py": '"""High.\n\nMay import: scripts.low."""\n',
            "high/b.py": "from scripts.low.a import f\n\ndef g():\n    pass\n",
            "loose.py": "import os\n",
        },
    )
    return root


def test_checks_find_an_upward_import_a_cycle_and_a_loose_module(bad_tree):
    problems = layer_violations(bad_tree)
    assert any("scripts.low.a imports scripts.high.b" in p for p in problems)
    assert any("scripts.loose: a module outside the packages" in p for p in problems)
    assert not any(p.startswith("scripts.high.b") for p in problems)  # downward is allowed
    cycles = import_cycles(bad_tree)
    assert cycles and set(cycles[0]) == {"scripts.high.b", "scripts.low.a"}


def test_a_package_without_a_declaration_is_refused(bad_tree):
    (bad_tree / "low" / "__init__.py").write_text('"""Low, no declaration."""\n')
    with pytest.raises(AssertionError, match="May import"):
        allowed_imports(bad_tree)
