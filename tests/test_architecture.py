"""The layering docs/ARCHITECTURE.md draws: every module imports only from its own layer or the layers below."""

from __future__ import annotations

import ast
from pathlib import Path

import lipcli

LAYERS = {
    0: ("spectral", "bounds", "precision", "distributed", "files", "errors"),
    1: ("compose", "nn", "attention", "constraints", "optim"),
    2: ("models", "presets"),
    3: ("checkpoint", "runfiles", "weightfiles", "reference"),
    4: ("tasks", "validation", "data", "images", "recall"),
    5: ("training", "resume", "anneal", "certification", "sensitivity", "attack", "activations", "convert",
        "projection", "sweep", "sweep_records"),
    6: ("cli", "cli_parsing", "render"),
}  # fmt: skip
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
PACKAGE = Path(lipcli.__file__).parent
ENTRY_POINTS = {"__init__", "__main__"}  # the package's public face: they may reach any layer


def _imported(path: Path) -> set[str]:
    """The lipcli modules ``path`` imports (relative imports, at any depth in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module} if node.module else {alias.name for alias in node.names}
    return names


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - ENTRY_POINTS
    assert modules == set(LAYER_OF), "add the module to docs/ARCHITECTURE.md and to LAYERS"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{path.stem} (layer {LAYER_OF[path.stem]}) imports {name} (layer {LAYER_OF[name]})"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem not in ENTRY_POINTS
        for name in sorted(_imported(path))
        if LAYER_OF.get(name, -1) > LAYER_OF[path.stem]
    ]
    assert not upward
