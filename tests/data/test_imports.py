"""vggnet.data has no import cycle: its modules import each other only at the top, along an acyclic graph."""

import ast
import pathlib

import vggnet.data

PACKAGE = pathlib.Path(vggnet.data.__file__).parent


def imported_data_modules(tree):
    """``(module, top_level)`` for every ``vggnet.data.X`` a module imports (absolute or relative)."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "vggnet.data." + node.module if node.level == 1 and node.module else node.module or ""
            names = [base] if base != "vggnet.data" else [f"vggnet.data.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("vggnet.data.") and (PACKAGE / f"{name.split('.')[2]}.py").is_file():
                yield name.split(".")[2], id(node) in top


def test_data_modules_form_an_acyclic_graph_of_top_level_imports():
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        edges = list(imported_data_modules(ast.parse(path.read_text())))
        assert all(top for _, top in edges), f"{path.name} imports a vggnet.data module inside a function"
        graph[path.stem] = {name for name, _ in edges}
    assert {"catalogue", "dataset", "images", "load", "folder"} <= set(graph) and "datasets" not in graph
    assert graph["catalogue"] == graph["dataset"] == graph["images"] == set()
    assert graph["load"] >= {"idx", "cifar", "folder"}
    done, visiting = set(), []

    def visit(name):
        assert name not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(name):] + [name])}"
        if name not in done:
            visiting.append(name)
            for dep in sorted(graph[name]):
                visit(dep)
            visiting.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)

