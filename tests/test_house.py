"""House rules a reader relies on: no import circle among the package's modules (lazy imports inside
functions included), and m2pt_kernels standing alone."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """{module: modules of the same package it imports}, a package's `__init__` counted only where a name
    is taken from it (not where `from package import submodule` merely loads a submodule)."""
    root = package_dir.parent
    files = {_module_name(p, root): p for p in package_dir.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name in files}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module not in files:
                    continue
                submodules = {f"{module}.{alias.name}" for alias in node.names} & set(files)
                deps |= submodules
                if len(submodules) < len(node.names):  # a name defined in `module` itself
                    deps.add(module)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, stack = set(), []

    def visit(module):
        if module in stack:
            return stack[stack.index(module):] + [module]
        if module in done:
            return None
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if found := visit(dep):
                return found
        stack.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if found := visit(module):
            return found
    return None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_in_m2pt_fast():
    graph = import_graph(ROOT / "m2pt_fast")
    assert "m2pt_fast.layers" in graph["m2pt_fast.llava_original"]  # the graph sees absolute imports
    assert "m2pt_fast.compat" in graph["m2pt_fast.reference"]  # and relative ones
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_circle_in_m2pt_kernels_and_it_never_imports_m2pt_fast():
    package = ROOT / "kernels" / "m2pt_kernels"
    assert find_cycle(import_graph(package)) is None
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] == "m2pt_fast" for n in names), path


def test_the_readme_map_names_every_module():
    layout = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    modules = [p.name for p in (ROOT / "m2pt_fast").glob("*.py") if p.name != "__init__.py"]
    missing = [name for name in modules if f" {name} " not in layout.replace("\n", " \n")]
    assert not missing, f"README's Layout lacks {missing}"
