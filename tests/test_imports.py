"""Dependencies run one way: the modules of `dtrak_core` import each other without a cycle.

The graph is read from the source with `ast`, so an import inside a function counts as much as one at
the top of a module (a function-level import that closes a cycle only hides it). An edge goes from a
module to every `dtrak_core` module it names: `import a.b`, `from a import b` where `b` is a submodule,
`from a.b import name`, relative imports, and the root package's lazy exports (`from dtrak_core import
Attributor` reaches `dtrak_core.attribution.attributor`).

A package's `__init__` is a node like any module: a package that imports its submodules is fine, and a
submodule that imports its parent package (whose `__init__` imports the submodule back) is a cycle.
Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`; those implicit runs are not edges, since
Python starts the parents first whatever the child does.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dtrak_core"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of `package`: dotted name -> file (a package's name maps to its `__init__.py`)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
    """The `_EXPORTS = {"Name": "dotted.module"}` table of a package imported lazily (PEP 562)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return {k: v for k, v in ast.literal_eval(node.value).items()}
    return {}


def imports_of(name: str, path: Path, modules: set[str], lazy: dict[str, dict[str, str]]) -> set[str]:
    """The modules of the package that module `name` (at `path`) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()

    def nearest(dotted: str) -> str | None:
        # `import a.b.c` where only `a.b` is a module of ours (c is an attribute): the longest prefix
        while dotted:
            if dotted in modules:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    target = nearest(alias.name)
                    if target:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif alias.name in lazy.get(source, {}):
                    found.add(lazy[source][alias.name])
                else:
                    target = nearest(source)
                    if target:
                        found.add(target)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    files = module_files(root, package)
    lazy = {name: _lazy_exports(ast.parse(path.read_text())) for name, path in files.items()
            if path.name == "__init__.py"}
    graph = {name: imports_of(name, path, set(files), lazy) for name, path in files.items()}
    for package, exports in lazy.items():  # a lazy package imports its exports when first asked for them
        graph[package] |= {module for module in exports.values() if module in files}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as [a, b, ..., a] (Tarjan's algorithm,
    then a shortest cycle through the component's first module by breadth-first search)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        # breadth-first from start back to start, inside the component
        parent, frontier = {}, [start]
        while frontier and start not in parent:
            next_frontier = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w in component and w not in parent:
                        parent[w] = v
                        next_frontier.append(w)
            frontier = next_frontier
        path, v = [start], parent[start]
        while v != start:
            path.append(v)
            v = parent[v]
        path.append(start)
        cycles.append(path[::-1])
    return sorted(cycles)


def test_cycle_finder_on_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"g"}, "g": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_every_kind_of_import(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text('_EXPORTS = {"Thing": "dtrak_core.sub.lazy"}\n')
    (package / "sub" / "__init__.py").write_text("from dtrak_core.sub.child import x\n")
    (package / "sub" / "child.py").write_text("x = 1\n")
    (package / "sub" / "lazy.py").write_text("Thing = 1\n")
    (package / "top.py").write_text("def f():\n    from .sub import child\n    return child\n")
    (package / "other.py").write_text("import dtrak_core.top\nfrom dtrak_core import Thing\n")
    (package / "cyclic.py").write_text("from dtrak_core.sub.child import x\n")
    (package / "sub" / "back.py").write_text("from .. import cyclic\nfrom ..sub import child\n")
    graph = import_graph(tmp_path, PACKAGE)
    assert graph["dtrak_core"] == {"dtrak_core.sub.lazy"}
    assert graph["dtrak_core.sub"] == {"dtrak_core.sub.child"}
    assert graph["dtrak_core.top"] == {"dtrak_core.sub.child"}  # a function-level, relative import
    assert graph["dtrak_core.other"] == {"dtrak_core.top", "dtrak_core.sub.lazy"}
    assert graph["dtrak_core.sub.back"] == {"dtrak_core.cyclic", "dtrak_core.sub.child"}
    assert find_cycles(graph) == []
    (package / "sub" / "child.py").write_text("def f():\n    from dtrak_core.sub import back\n")  # closes two
    assert find_cycles(import_graph(tmp_path, PACKAGE)) == [
        ["dtrak_core.cyclic", "dtrak_core.sub.child", "dtrak_core.sub.back", "dtrak_core.cyclic"]]


def test_dtrak_core_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in dtrak_core:\n" + "\n".join(" -> ".join(c) for c in cycles)


# The evaluation reads one way: a metric scores given data, a harness produces that data (retrains,
# measurements, the cells of a table), a report writes what harnesses computed.
EVALUATION_LAYERS = {
    "metric": ("lds", "quality", "evidence"),
    "harness": ("retrain", "lds_run", "lds_own", "lds_evaluation", "counterfactual", "tables", "tuning"),
    "report": ("tables_report", "counterfactual_report", "lds_own_report", "study"),
}


def test_evaluation_reads_metric_then_harness_then_report():
    graph = import_graph()
    layer = {f"{PACKAGE}.evaluation.{m}": i for i, (_, ms) in enumerate(EVALUATION_LAYERS.items()) for m in ms}
    modules = {m for m in graph if m.startswith(f"{PACKAGE}.evaluation.")}
    assert modules == set(layer), f"place every evaluation module in a layer: {sorted(modules ^ set(layer))}"
    names = list(EVALUATION_LAYERS)
    upward = [f"{a} ({names[layer[a]]}) imports {b} ({names[layer[b]]})"
              for a in sorted(modules) for b in sorted(graph[a]) if b in layer and layer[b] > layer[a]]
    assert not upward, "\n".join(upward)
    # and below the evaluation, nothing reaches up into it
    low = ("files", "checksums", "errors", "shared", "folder", "model", "attribution")
    reach_up = [f"{a} imports {b}" for a in sorted(graph) for b in sorted(graph[a])
                if a.count(".") and a.split(".")[1] in low and b in layer]
    assert not reach_up, "\n".join(reach_up)


if __name__ == "__main__":
    for cycle in find_cycles(import_graph()):
        print(" -> ".join(cycle))
    pytest.main([__file__, "-q"])


def test_only_the_ui_package_imports_gradio():
    """The core runs without a browser app: gradio is imported by `dtrak_core.ui` alone."""
    found = []
    for name, path in module_files().items():
        if name == f"{PACKAGE}.ui" or name.startswith(f"{PACKAGE}.ui."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "gradio" for a in node.names) or \
                    isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gradio":
                found.append(name)
    assert not found, f"gradio imported outside dtrak_core.ui: {sorted(set(found))}"
