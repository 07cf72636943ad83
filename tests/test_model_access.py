"""How the package's modules depend on each other, read from their source with ``ast``.

* No module imports an underscore-prefixed name of another module of the package: what
  one module shares with others is public (most of it in
  :mod:`intattn_analysis.model_access`).
* The modules import each other without a cycle, at module level and counting the imports
  inside functions as well.
* Hook names are spelled only in :mod:`intattn_analysis.architectures` (the tables) and
  :mod:`intattn_analysis.model_access`; every other module asks them for the name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import intattn_analysis
from intattn_analysis import model_access
from intattn_analysis.architectures import HOOKS, OPTIONAL_HOOKS

PACKAGE = Path(intattn_analysis.__file__).resolve().parent
#: The modules where hook names may be written out.
HOOK_NAME_MODULES = {"intattn_analysis.architectures", "intattn_analysis.model_access"}
#: ``(importing module, imported module, name)`` of the underscore imports allowed between
#: package modules: none.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES: dict[str, ast.Module] = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _imported_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module ``node`` (in ``module``) imports from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]  # a module's relative imports start at its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.stmt) -> set[str]:
    """The package modules an import statement loads."""
    found = set()
    if isinstance(node, ast.Import):
        found = {alias.name for alias in node.names if alias.name in MODULES}
    elif isinstance(node, ast.ImportFrom):
        source = _imported_from(module, node)
        for alias in node.names:
            if f"{source}.{alias.name}" in MODULES:  # ``from . import tracing``
                found.add(f"{source}.{alias.name}")
            elif source in MODULES:
                found.add(source)
    return found - {module}


def _is_type_checking(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _module_level_imports(body: list[ast.stmt]):
    """Import statements run when the module is imported (not those inside functions or
    classes, nor under ``if TYPE_CHECKING``)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or _is_type_checking(node):
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _module_level_imports(getattr(node, field, []) or [])


def _graph(module_level: bool) -> dict[str, set[str]]:
    graph = {}
    for name, tree in TREES.items():
        if module_level:
            imports = _module_level_imports(tree.body)
        else:
            imports = (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        graph[name] = set().union(*(_targets(name, node) for node in imports))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state:
                found = visit(child, path)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def test_no_module_imports_a_private_name_of_another():
    found = set()
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _imported_from(name, node)
            if source != "intattn_analysis" and not source.startswith("intattn_analysis."):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.add((name, source, alias.name))
    added = found - KNOWN_PRIVATE_IMPORTS
    assert not added, (
        f"modules import private names of other modules: {sorted(added)}; make the name "
        "public (shared model access belongs in intattn_analysis.model_access)"
    )


def test_no_import_cycle_at_module_level():
    cycle = _cycle(_graph(module_level=True))
    assert cycle is None, f"module-level import cycle: {' -> '.join(cycle)}"


def test_no_import_cycle_counting_imports_inside_functions():
    cycle = _cycle(_graph(module_level=False))
    assert cycle is None, (
        f"import cycle (imports inside functions included): {' -> '.join(cycle)}; move what "
        "both modules need to the lower one"
    )


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_hook_names_are_spelled_only_in_the_access_modules():
    """No string in the code of another module (docstrings aside) holds a hook name of
    the tables, with or without its ``blocks.{l}.`` prefix; the names that not every
    bridge has are not even mentioned elsewhere, comments and docstrings included."""
    spellings = {template.split("{l}.")[-1] for template in (*HOOKS.values(), *OPTIONAL_HOOKS.values())}
    optional = {template.split("{l}.")[-1] for template in OPTIONAL_HOOKS.values()}
    found = []
    for name, tree in TREES.items():
        if name in HOOK_NAME_MODULES:
            continue
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found += [(name, node.lineno, s) for s in sorted(spellings) if s in node.value]
        text = MODULES[name].read_text()
        found += [(name, "source", s) for s in sorted(optional) if s in text]
    assert not found, (
        f"hook names spelled outside {sorted(HOOK_NAME_MODULES)}: {found}; use "
        "intattn_analysis.model_access (hook(), FINAL_NORM_HOOK, attention_key_hook, ...)"
    )


def test_access_names_come_from_the_tables():
    assert model_access.FINAL_NORM_HOOK == OPTIONAL_HOOKS["final_norm"]
    assert model_access.attention_value_hook(3) == OPTIONAL_HOOKS["attn_v"].format(l=3)
    assert model_access.hook("resid_post", 2) == HOOKS["resid_post"].format(l=2)
    assert set(model_access.KEY_HOOKS) <= set(OPTIONAL_HOOKS)
