"""House rules a reader relies on: no import circle among the package's modules (lazy imports inside
functions included), and m2pt_kernels standing alone."""
import ast
import re
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
    assert "m2pt_fast.models.layers" in graph["m2pt_fast.models.llava_original"]  # the graph sees absolute imports
    assert "m2pt_fast.models.llava_original" in graph["m2pt_fast.models.to_nf4"]  # and `from package import module`
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_circle_in_m2pt_kernels_and_it_never_imports_m2pt_fast():
    package = ROOT / "kernels" / "m2pt_kernels"
    graph = import_graph(package)
    assert "m2pt_kernels.nf4" in graph["m2pt_kernels"]  # the graph sees relative imports
    assert find_cycle(graph) is None
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] == "m2pt_fast" for n in names), path


# What may be imported inside a function: the optional dependencies (setup.py's extras: a user of the
# library may lack them), and `resource`, which exists on Unix only.
LAZY_ALLOWED = {"deepspeed", "peft", "psutil", "torch.utils.tensorboard", "wandb", "matplotlib", "resource"}


def imports_inside_functions(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a function body of `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    found += [(inner.lineno, alias.name) for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    found.append((inner.lineno, "." * inner.level + (inner.module or "")))
    return found


def test_the_lazy_import_finder_finds_them(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    import json\n    from .x import y\n    return json, y\n")
    assert imports_inside_functions(source) == [(4, "json"), (5, ".x")]


def test_only_optional_dependencies_are_imported_inside_functions():
    """An import in a function hides a dependency from the reader; only one a user may lack excuses it
    (import cycles are broken by moving code instead)."""
    unexcused = []
    for path in sorted((ROOT / "m2pt_fast").rglob("*.py")):
        for line, module in imports_inside_functions(path):
            if not any(module == allowed or module.startswith(allowed + ".") for allowed in LAZY_ALLOWED):
                unexcused.append(f"{path.relative_to(ROOT)}:{line} {module}")
    assert not unexcused, "imports inside functions with no excuse:\n" + "\n".join(unexcused)


def readme_map() -> dict[str, list[str]]:
    """{folder under m2pt_fast/ ("" for the package's own): module files the README's Layout lists in it}.
    The map draws `m2pt_fast/` and then each subpackage as `  name/` at two spaces, its modules below it."""
    layout = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("```")[1]
    listed, folder = {}, None
    for line in layout.splitlines():
        if line.startswith("m2pt_fast/"):
            folder = ""
        elif folder is not None and re.match(r"^  \S+/", line):
            folder = line.split()[0].rstrip("/")
        elif folder is not None and line and not line.startswith(" "):
            folder = None  # kernels/, bench/, ...: past the package
        if folder is not None:
            listed.setdefault(folder, []).extend(re.findall(r"(?:^|\s)(\w+\.py)(?=\s|,|$)", line))
    return listed


def test_the_readme_map_names_every_module_where_it_is():
    package = ROOT / "m2pt_fast"
    on_disk = {}
    for path in package.rglob("*.py"):
        folder = path.parent.relative_to(package).as_posix()
        if path.name != "__init__.py" or folder == ".":
            on_disk.setdefault("" if folder == "." else folder, []).append(path.name)
    listed = readme_map()
    for folder, names in on_disk.items():
        missing = sorted(set(names) - set(listed.get(folder, [])))
        assert not missing, f"README's Layout lacks {missing} under m2pt_fast/{folder}"
    for folder, names in listed.items():
        stale = sorted(set(names) - set(on_disk.get(folder, [])))
        assert not stale, f"README's Layout lists {stale} under m2pt_fast/{folder}, which are not there"
