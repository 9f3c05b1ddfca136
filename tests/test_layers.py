"""The house's layers (docs/architecture.md): a module imports only from its own layer or below, lazily
imported modules included. Cross-cutting helpers (config, checkpoint, tracking, distributed) sit between
the component layers and the loop."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sapo"

LAYERS = {
    "sapo.objectives": 1,
    "sapo.ops": 2,
    "sapo.models": 3, "sapo.rollout": 3, "sapo.rewards": 3, "sapo.data": 3,
    "sapo.config": 3.5, "sapo.checkpoint": 3.5, "sapo.tracking": 3.5, "sapo.distributed": 3.5,
    "sapo.storage": 3.5, "sapo.runlock": 3.5, "sapo.trackers": 3.5,
    "sapo.train": 4, "sapo.training": 4, "sapo.evaluate": 4, "sapo.resume": 4,
    "sapo.cli": 5, "sapo.report": 5, "sapo.compare": 5, "sapo.compare_plots": 5, "sapo.compare_grids": 5, "sapo.compare_offpolicy": 5, "sapo.__main__": 5,
}
INTEGRATIONS_MAY_IMPORT = 1  # plug-ins for other trainers use the objectives only


def _layer(module: str) -> float | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    return None


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return [(line, m) for line, m in out if m == "sapo" or m.startswith("sapo.")]


def test_every_module_has_a_layer():
    missing = [name for name, _ in _modules()
               if name not in ("sapo",) and not name.startswith("sapo.integrations") and _layer(name) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py and docs/architecture.md: {missing}"


@pytest.mark.parametrize("name, path", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_no_module_imports_a_higher_layer(name, path):
    if name == "sapo":
        return
    own = INTEGRATIONS_MAY_IMPORT if name.startswith("sapo.integrations") else _layer(name)
    higher = [(line, module) for line, module in _imports(path)
              if (_layer(module) or 0) > own]
    assert not higher, f"{name} (layer {own}) imports higher layers: {higher}"
