"""The package layout is the architecture: folders are layers, imports only go down, no module imports
itself back through others. Read from the source's AST (every import, also those inside functions)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("so8t", "so8t_kernels")
# Top to bottom: a module may import its own layer's folder and any layer below it, never one above.
# Layers on one line are peers and must not import each other.
LAYERS = [
    ["so8t.commands"],
    ["so8t.serve", "so8t.training", "so8t.vllm"],
    ["so8t.monitor"],
    ["so8t.judge"],
    ["so8t.models"],
    ["so8t.gates"],
    ["so8t.data"],
    ["so8t.audit"],
    ["so8t_kernels"],
]
ANYWHERE = {"so8t", "so8t.errors", "so8t.durable"}  # the public API's version string, the one exception type, fsync
MAX_ROOT_MODULES = 5


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The so8t/so8t_kernels modules ``name`` imports (a ``from package import name`` that names a module
    counts as that module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in PACKAGES and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> int | None:
    for index, peers in enumerate(LAYERS):
        if any(name == folder or name.startswith(folder + ".") for folder in peers):
            return index
    return None


def folder_of(name: str) -> str:
    return next(folder for peers in LAYERS for folder in peers if name == folder or name.startswith(folder + "."))


def test_the_graph_is_read():
    assert "so8t.gates.placement" in GRAPH["so8t.training.finetune"]
    assert "so8t_kernels.so8_rotate" in GRAPH["so8t.gates.placement"] or "so8t_kernels" in GRAPH["so8t.gates.placement"]


def test_no_import_cycles():
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_imports_only_go_down():
    wrong = []
    for name, targets in sorted(GRAPH.items()):
        source = layer_of(name)
        if source is None:
            continue
        for target in sorted(targets):
            if target in ANYWHERE or folder_of(name) == (folder_of(target) if layer_of(target) is not None else None):
                continue
            if layer_of(target) is None or layer_of(target) <= source:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_is_in_a_layer_or_the_root():
    loose = [name for name in MODULES if layer_of(name) is None and name.count(".") > 0 and name.startswith("so8t.")]
    root = sorted(name for name in MODULES if name.startswith("so8t.") and name.count(".") == 1
                  and (ROOT / "so8t" / f"{name.split('.')[1]}.py").is_file())
    assert len(root) + 1 <= MAX_ROOT_MODULES, root  # + so8t/__init__.py
    assert set(loose) == set(root), sorted(set(loose) - set(root))


@pytest.mark.parametrize("prefix", ["so8t.serve", "so8t.commands.generate", "so8t.vllm"])
def test_serving_and_generation_never_import_training(prefix):
    def reaches(name, seen):
        for target in GRAPH[name]:
            if target not in seen:
                seen.add(target)
                reaches(target, seen)
        return seen

    for name in (name for name in MODULES if name == prefix or name.startswith(prefix + ".")):
        assert not [target for target in reaches(name, set()) if target.startswith("so8t.training")], name
