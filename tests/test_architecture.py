"""The floor plan (docs/architecture.md) holds: each module imports only its own layer or the
layers below it (imports inside functions count too), and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kneebatch"

# lowest first; a module may import its own layer and the layers before it
LAYERS = {
    "foundation": ("kneebatch", "kneebatch.errors", "kneebatch.geometry", "kneebatch.ops", "kneebatch.labels",
                   "kneebatch.label_sets", "kneebatch.sides", "kneebatch.outputs", "kneebatch.progress",
                   "kneebatch.keys", "kneebatch.identifiers", "kneebatch.stats"),
    "data": ("kneebatch.ingest", "kneebatch.synth"),
    "models": ("kneebatch.models",),
    "inference": ("kneebatch.inference",),
    "analysis": ("kneebatch.measure", "kneebatch.cartilage_regions", "kneebatch.mesh", "kneebatch.export",
                 "kneebatch.dicom_seg", "kneebatch.plots",
                 "kneebatch.findings", "kneebatch.report", "kneebatch.clinical", "kneebatch.evaluate",
                 "kneebatch.plausibility"),
    "distributed": ("kneebatch.distributed",),
    "jobs": ("kneebatch.jobs",),
    "training": ("kneebatch.training",),
    "apps": ("kneebatch.cli", "kneebatch.demo", "kneebatch.__main__", "kneebatch.api", "kneebatch.registry"),
}
ORDER = list(LAYERS)
# what a layer may not import although it lies below: the data layer knows no models, and inference
# (arrays, engines, options) knows no store, no files and no cluster, as MONAI's inferers know no files
FORBIDDEN = {"inference": ("data", "analysis", "distributed"), "analysis": ("inference",), "models": ("data",)}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    best = max(((prefix, layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=lambda p: len(p[0]), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py (and docs/architecture.md)")
    return best[1]


def _type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """The kneebatch modules ``path`` (the module ``module``) imports anywhere, not under ``if TYPE_CHECKING``."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()

    def visit(node):
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # "from kneebatch.ingest import dicom" imports the module kneebatch.ingest.dicom
                candidate = f"{base}.{a.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() or \
                    (PACKAGE.parent / candidate.replace(".", "/")).is_dir()
                found.add(candidate if is_module else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m == "kneebatch" or m.startswith("kneebatch.")} - {module}


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert len(GRAPH) > 60
    for module in GRAPH:
        layer_of(module)


def violations(module: str, imports) -> list[str]:
    mine = ORDER.index(layer_of(module))
    found = []
    for target in sorted(imports):
        theirs = layer_of(target)
        if ORDER.index(theirs) > mine:
            found.append(f"{module} ({ORDER[mine]}) imports {target} ({theirs}), a layer above")
        elif theirs in FORBIDDEN.get(ORDER[mine], ()):
            found.append(f"{module} ({ORDER[mine]}) may not import {target} ({theirs})")
    return found


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    assert violations(module, GRAPH[module]) == []


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_rules_can_fail(tmp_path):
    """An import inside a function is seen; one up a layer, and one into a forbidden layer, are reported."""
    path = tmp_path / "m.py"
    path.write_text("import numpy\n\ndef f():\n    from kneebatch.jobs.run import run\n    from kneebatch.ingest import store\n")
    imports = imports_of(path, "kneebatch.inference.m")
    assert imports == {"kneebatch.jobs.run", "kneebatch.ingest.store"}
    assert violations("kneebatch.inference.m", imports) == [
        "kneebatch.inference.m (inference) may not import kneebatch.ingest.store (data)",
        "kneebatch.inference.m (inference) imports kneebatch.jobs.run (jobs), a layer above"]
    assert violations("kneebatch.training.m", imports) == []
