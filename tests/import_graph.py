"""The project's import graph, read with ast from the source (nothing is imported): every module's
imports of the project's own modules, those inside functions included. It holds when the post's
files (features.py, data.py, model.py) import nothing of harness/ and no module reaches itself.

    python tests/import_graph.py      # the graph, one line a module; exit 1 where it does not hold
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POST_FILES = ("features", "data", "model")


def project_modules(root=ROOT):
    """{module name: its file} of the scripts in root, the package harness and its modules."""
    found = {"harness": os.path.join(root, "harness", "__init__.py")}
    for folder, prefix in ((root, ""), (os.path.join(root, "harness"), "harness.")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py") and name != "__init__.py":
                found[prefix + name[:-3]] = os.path.join(folder, name)
    return found


def imports_of(module, path, modules):
    """The project's modules that module (its file at path) imports, anywhere in it, in order of
    appearance: `import m`, `from m import x`, `from harness import m`, and relative imports
    (`from . import m` in harness/) resolved against its package."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module.rpartition(".")[0] if os.path.basename(path) != "__init__.py" else module
    named = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import m, from .m import x
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = ".".join(part for part in (parent, base) if part)
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            submodules = [name for name in submodules if name in modules]
            named += submodules or [base]  # `from harness import files` is harness.files
    return list(dict.fromkeys(n for n in named if n in modules and n != module))


def import_graph(root=ROOT):
    """{module: [the project's modules it imports]}."""
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph):
    """Each import circle once, as the list of modules around it, the first repeated at the end."""
    found, done = [], set()

    def visit(module, path):
        if module in path:
            circle = path[path.index(module) :] + [module]
            if set(circle) not in [set(c) for c in found]:
                found.append(circle)
            return
        if module in done:
            return
        for imported in graph.get(module, []):
            visit(imported, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
    return found


def post_imports_of_harness(graph):
    """(post file, harness module) for each import of harness/ in the post's files."""
    return [(m, i) for m in POST_FILES for i in graph.get(m, []) if i.startswith("harness")]


def in_import_order(graph):
    """The modules, each after every module it imports (the graph must have no circle)."""
    order = []

    def place(module):
        if module not in order:
            for imported in graph[module]:
                place(imported)
            order.append(module)

    for module in graph:
        place(module)
    return order


if __name__ == "__main__":
    graph = import_graph()
    for module in in_import_order(graph) if not circles(graph) else graph:
        print(f"{module}: {', '.join(graph[module]) or '-'}")
    faults = [f"{m} imports {i}" for m, i in post_imports_of_harness(graph)]
    faults += ["import circle: " + " -> ".join(c) for c in circles(graph)]
    for fault in faults:
        print(f"error: {fault}", file=sys.stderr)
    sys.exit(1 if faults else 0)
