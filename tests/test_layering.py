"""The architecture as a test: one-way layer dependencies, vLLM internals only in ``patches/``, no cycles.

Layers (a module may import its own layer and the layers to its left)::

    core (0) -> kernels (1) -> runtime (2) -> patches (3) -> serving (4) -> offline (5)

Function-local imports count as much as module-level ones. Outside ``patches/`` vLLM may be reached only
through its public entry points (``vllm.LLM`` / ``vllm.SamplingParams`` offline, the CLI ``main`` in
the serving launcher).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folders -> the package they install as (setup.py's package_dir).
SOURCES = {"value_steer": ROOT / "value_steer", "value_steer.kernels": ROOT / "kernels",
           "value_steer.patches": ROOT / "patches"}
LAYERS = {"core": 0, "kernels": 1, "runtime": 2, "patches": 3, "serving": 4, "offline": 5}
# Top-level modules of value_steer and their layer (the public shims belong to serving).
TOP_LEVEL = {"value_steer": 0, "value_steer._ext": 0, "value_steer.worker": 4, "value_steer.vllm_cli": 4}
# vLLM imports allowed outside patches/, by layer: public API only.
PUBLIC_VLLM = {4: {"vllm.entrypoints.cli.main"}, 5: {"vllm"}}
PUBLIC_VLLM_NAMES = {"vllm": {"LLM", "SamplingParams"}}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([pkg, *parts])] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS[parts[1]]
    raise AssertionError(f"{module}: not in any layer; add it to a layer folder or to TOP_LEVEL")


def _resolve(module: str) -> str | None:
    """The longest known module name ``module`` refers to (a package's __init__ or a submodule)."""
    while module:
        if module in MODULES:
            return module
        module = module.rpartition(".")[0]
    return None


def imports(path: Path, module: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """``(line, imported module, names)`` for every import in the file, wherever it sits."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names = tuple(a.name for a in node.names)
            out.append((node.lineno, base, names))
            # `from pkg import submodule` imports the submodule.
            out += [(node.lineno, f"{base}.{n}", ()) for n in names if f"{base}.{n}" in MODULES]
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _, target, _ in imports(path, module):
            if target.startswith("value_steer"):
                resolved = _resolve(target)
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_point_down_the_layers():
    bad = []
    for module, path in MODULES.items():
        src = layer_of(module)
        for line, target, _ in imports(path, module):
            resolved = _resolve(target) if target.startswith("value_steer") else None
            if resolved and layer_of(resolved) > src:
                where = f"{path.relative_to(ROOT)}:{line}"
                bad.append(f"{where}: layer {src} imports {resolved} (layer {layer_of(resolved)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_vllm_internals_only_in_patches():
    bad = []
    for module, path in MODULES.items():
        src = layer_of(module)
        if src == LAYERS["patches"]:
            continue
        for line, target, names in imports(path, module):
            if target != "vllm" and not target.startswith("vllm."):
                continue
            allowed = target in PUBLIC_VLLM.get(src, set())
            if allowed and target in PUBLIC_VLLM_NAMES:
                allowed = set(names) <= PUBLIC_VLLM_NAMES[target]
            if not allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target} {list(names)}")
    assert not bad, "vLLM reached outside patches/:\n" + "\n".join(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as ``a -> b -> ... -> a``."""
    color: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in color:
                visit(nxt)
        stack.pop()
        color[node] = 2

    for node in sorted(graph):
        if node not in color:
            visit(node)
    return cycles


def test_no_import_cycles():
    graph = _edges()
    # A package __init__ re-exporting its own submodules is not a cycle with them.
    graph = {a: {b for b in bs if not (MODULES[a].name == "__init__.py" and b.startswith(a + "."))}
             for a, bs in graph.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", ["value_steer.core.config", "value_steer.core.checkpoint",
                                    "value_steer.core.features", "value_steer.core.vfd_math",
                                    "value_steer.kernels", "value_steer.runtime.state",
                                    "value_steer.runtime.vfd_state", "value_steer.runtime.capture",
                                    "value_steer.serving", "value_steer.offline.assets"])
def test_lower_layers_import_no_vllm(module):
    code = f"import sys, {module}; bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} imported {out.strip()}"


def test_the_checker_catches_violations(tmp_path):
    """The rules are not vacuous: an upward, a vLLM-internal and a cyclic import are each found."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from value_steer.offline.cli import main\n    import vllm.v1.worker\n")
    found = imports(src, "value_steer.core.fake")
    targets = {t for _, t, _ in found}
    assert "value_steer.offline.cli" in targets and "vllm.v1.worker" in targets
    assert layer_of(_resolve("value_steer.offline.cli")) > layer_of("value_steer.core.fake")
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
