"""The package layers hold: each package of slm imports only the packages below it (read with ``ast``
from every module, at module and function level), hydra/omegaconf only inside ``slm/cli``, no circle
between packages nor between modules (inside a package included, on the real imports), no two modules
with one name, and function-level imports of slm only where they load an optional dependency."""

import ast
from pathlib import Path

import pytest

SLM = Path(__file__).resolve().parent.parent / "slm"

# package -> the slm packages it may import (the layout in the README, bottom to top)
ALLOWED = {
    "selection": set(),
    "head": set(),
    "data": set(),
    "runs": set(),
    "model": {"head", "selection"},
    "parallel": {"model"},
    "trainers": {"model", "selection", "reference"},
    "hf_trainer": {"trainers"},  # deprecated paths, re-exporting slm.trainers for one release
    "trl_trainer": {"trainers"},
    "bench": {"head", "model", "selection"},
    "reference": {"data", "model", "parallel"},
    "train": {"data", "model", "parallel", "reference", "runs", "selection"},  # data: what its columns mean
    "recipes": {"data", "model", "parallel", "reference", "runs", "selection", "train"},
    "analysis": {"data", "model", "reference", "runs", "selection"},
    "cli": {"data", "model", "parallel", "recipes", "reference", "runs", "selection", "train"},
    "__init__": {"selection"},
}
HYDRA = {"hydra", "omegaconf"}
# Imported inside functions on purpose: optional dependencies, each loaded only where it is used.
# The head's Triton kernels (slm.head.fused and slm.head.kernels bring in triton) load on first use; TRL on
# first use of the TRL trainers.
OPTIONAL_SLM = {"slm.head.fused", "slm.head.kernels", "slm.trainers.trl_integration"}


def package_of(path: Path, root: Path = SLM) -> str:
    rel = path.relative_to(root).parts
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def imports(tree: ast.AST):
    """(module imported, whether inside a function, line) for every import in ``tree``."""
    inner = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and not n.level:
            names = [f"{n.module}.{a.name}" for a in n.names] if n.module == "slm" else [n.module]
            if any(f"{n.module}.{a.name}" in OPTIONAL_SLM for a in n.names):
                names = [f"{n.module}.{a.name}" for a in n.names]
            yield from ((m, id(n) in inner, n.lineno) for m in names)
        elif isinstance(n, ast.Import):
            yield from ((a.name, id(n) in inner, n.lineno) for a in n.names)


def edges(root: Path = SLM) -> list[tuple[str, str, str]]:
    """(importing package, imported slm package or hydra/omegaconf, where) over ``root``'s modules."""
    out = []
    for path in sorted(root.rglob("*.py")):
        here, where = package_of(path, root), path.relative_to(root.parent)
        for module, _, line in imports(ast.parse(path.read_text())):
            parts = module.split(".")
            if parts[0] == "slm" and len(parts) > 1 and parts[1] != here:
                out.append((here, parts[1], f"{where}:{line}"))
            elif parts[0] in HYDRA:
                out.append((here, parts[0], f"{where}:{line}"))
    return out


def upward(found: list[tuple[str, str, str]]) -> list[str]:
    return [f"{where}: {src} imports {dst}" for src, dst, where in found
            if dst not in HYDRA and dst not in ALLOWED.get(src, set())]  # fmt: skip


def test_every_package_has_a_place_in_the_layers():
    packages = {package_of(p) for p in SLM.rglob("*.py")}
    assert packages == set(ALLOWED), "a new package needs its row in ALLOWED (and in the README's tree)"


def test_packages_import_only_the_layers_below_them():
    assert upward(edges()) == []


def test_hydra_and_omegaconf_are_imported_only_by_the_cli():
    assert [f"{where}: {src} imports {dst}" for src, dst, where in edges() if dst in HYDRA and src != "cli"] == []


def test_the_allowed_imports_form_no_circle():
    done = set()

    def visit(node, path):
        assert node not in path, f"circle: {' -> '.join([*path, node])}"
        if node in done:
            return
        for nxt in ALLOWED[node]:
            visit(nxt, [*path, node])
        done.add(node)

    for package in ALLOWED:
        visit(package, [])


def test_function_level_imports_are_of_optional_dependencies_only():
    found = []
    for path in sorted(SLM.rglob("*.py")):
        for module, inner, line in imports(ast.parse(path.read_text())):
            if inner and module.split(".")[0] == "slm" and module not in OPTIONAL_SLM:
                found.append(f"{path.relative_to(SLM.parent)}:{line}: {module}")
    assert found == []


@pytest.mark.parametrize("added", ["from slm.train import Trainer", "import slm.cli.validation"])
def test_an_added_upward_import_is_caught(tmp_path, added):
    fake = tmp_path / "slm"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "leak.py").write_text(f"{added}\n")
    assert upward(edges(fake)), "an import of a higher layer from slm.data must be reported"


def module_of(path: Path, root: Path = SLM) -> str:
    """``slm.head.output`` for slm/head/output.py, ``slm.head`` for slm/head/__init__.py."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph(root: Path = SLM) -> dict[str, set[str]]:
    """module -> the slm modules it imports, at module and function level. ``from pkg import name`` is an
    import of ``pkg.name`` where that is a module, else of ``pkg`` (its face)."""
    modules = {module_of(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        out = set()
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module and not n.level and n.module.split(".")[0] == root.name:
                for a in n.names:
                    out.add(f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in modules else n.module)
            elif isinstance(n, ast.Import):
                out.update(a.name for a in n.names if a.name in modules)
        graph[name] = {m for m in out if m in modules and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[str]:
    found, done = [], set()

    def visit(node, path):
        if node in path:
            found.append(" -> ".join([*path[path.index(node) :], node]))
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_no_circle_between_modules_on_the_real_imports():
    assert circles(module_graph()) == []


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for path in SLM.rglob("*.py"):
        if path.stem not in ("__init__", "__main__"):
            names.setdefault(path.stem, []).append(str(path.relative_to(SLM.parent)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_an_injected_circle_inside_a_package_is_caught(tmp_path):
    fake = tmp_path / "slm"
    (fake / "head").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "head" / "__init__.py").write_text("from slm.head.output import OutputHead\n")
    (fake / "head" / "output.py").write_text("def f():\n    from slm.head import fused\n")  # function level
    (fake / "head" / "fused.py").write_text("from slm.head.output import OutputHead\n")
    assert circles(module_graph(fake)) == ["slm.head.output -> slm.head.fused -> slm.head.output"]
    (fake / "head" / "output.py").write_text("X = 1\n")
    assert circles(module_graph(fake)) == []


def test_no_two_public_functions_or_classes_share_a_name():
    """A name says one thing across slm (``main``, each command's entry point, excepted)."""
    names: dict[str, list[str]] = {}
    for path in SLM.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                names.setdefault(node.name, []).append(str(path.relative_to(SLM.parent)))
    assert {k: v for k, v in names.items() if len(v) > 1 and k != "main"} == {}
