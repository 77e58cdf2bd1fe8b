"""The package's layering (docs/architecture.md): each layer imports only from the layers before it.

Every import of a `blip2_jax` module is read from the source (top level and inside functions) and
checked against the order below; a failure names the file, the line and both layers. Import cycles
are refused too, and an import placed inside a function must say why (a comment on its line or the
line above), since such imports hide the module graph from the reader.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blip2_jax"

# Layer order. A module belongs to the layer of its longest matching prefix.
LAYERS = (
    ("foundations", ("blip2_jax.config_sections", "blip2_jax.compilation_cache", "blip2_jax.distributed", "blip2_jax.models",
                     "blip2_jax.data")),
    ("convert", ("blip2_jax.convert",)),
    ("checkpoint, sharding", ("blip2_jax.checkpoint", "blip2_jax.sharding")),
    ("model spec", ("blip2_jax.spec",)),
    ("workdir", ("blip2_jax.workdir",)),
    ("public API", ("blip2_jax", "blip2_jax.pretrained", "blip2_jax.processor", "blip2_jax.decoding")),
    ("evaluate", ("blip2_jax.evaluate",)),
    ("train", ("blip2_jax.train", "blip2_jax.config_validation")),
    ("entry points", ("blip2_jax.main", "blip2_jax.caption", "blip2_jax.classify", "blip2_jax.evaluate.run",
                      "blip2_jax.plan", "blip2_jax.flag_errors", "blip2_jax.serve")),
)


def layer_of(module: str) -> int:
    best, rank = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, rank = p, i
    if rank is None:
        raise AssertionError(f"{module}: in no layer of tests/test_import_layers.py LAYERS (add it)")
    return rank


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def imports_of(path: pathlib.Path):
    """`(line, imported module, inside a function)` for every import of a blip2_jax module."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base_pkg = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base_pkg}.{base}" if base else base_pkg
            # `from pkg import name`: the submodule pkg.name when it is one, else pkg itself.
            targets = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        for target in targets:
            if target == "blip2_jax" or target.startswith("blip2_jax."):
                yield node.lineno, target, id(node) in inner


def package_files():
    return sorted(PACKAGE.rglob("*.py"))


def graph():
    return {module_name(p): [(line, t, inner) for line, t, inner in imports_of(p)] for p in package_files()}


def test_every_import_goes_down_the_layers():
    problems = []
    for path in package_files():
        here = module_name(path)
        for line, target, _ in imports_of(path):
            if layer_of(target) > layer_of(here):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {here} ({LAYERS[layer_of(here)][0]}) imports "
                                f"{target} ({LAYERS[layer_of(target)][0]}), a later layer")
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    edges = {m: {t for _, t, _ in imps if t != m} for m, imps in graph().items()}
    # Tarjan's strongly connected components; any component of 2+ modules is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_inside_functions_say_why():
    unexplained = []
    for path in package_files():
        lines = path.read_text().splitlines()
        for line, target, inner in imports_of(path):
            if inner and "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
                unexplained.append(f"{path.relative_to(ROOT)}:{line}: import of {target} inside a function")
    assert not unexplained, "\n".join(unexplained)


@pytest.mark.parametrize("source, target", [
    ("blip2_jax.pretrained", "blip2_jax.evaluate.load"),     # the public API reaching into evaluation
    ("blip2_jax.processor", "blip2_jax.train.stage2"),       # the processor reaching into training
    ("blip2_jax.convert.lavis", "blip2_jax.pretrained"),      # a converter reaching into the API
    ("blip2_jax.evaluate.load", "blip2_jax.train.stage1"),    # evaluation reaching into training
    ("blip2_jax.spec.weights", "blip2_jax.workdir"),
])
def test_the_check_catches_the_old_cycle_edges(source, target):
    """The edges of the import cycle this layering removed would each fail the check."""
    assert layer_of(target) > layer_of(source)
