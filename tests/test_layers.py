"""The package's layers: every import points down, and no module imports itself back through others.

Layers, bottom up (README "How it is built"): storage < ops (with kernels/ and _C) < model < data, interop
< train < eval. A module may import its own folder and any folder of a lower layer; data and interop are
peers and import neither each other. The package's own top-level modules (`m3ae_engine/__init__.py`, the
`python -m` aliases) are the facade above every layer, and nothing inside a layer imports them.
Every import counts, those inside functions included: a lazy import is still a dependency, and the
circles this test guards against (checkpoint -> convert -> model -> pretrained -> convert) hid in them.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parent.parent
PKG = "m3ae_engine"
LAYER = {"storage": 0, "ops": 1, "model": 2, "data": 3, "interop": 3, "train": 4, "eval": 5}
FOLDER_OF_TOP = {"kernels": "ops", "_C": "ops"}  # m3ae_engine.kernels (repo kernels/) and the CUDA build


def package_modules() -> Dict[str, Path]:
    """{module name: file} for m3ae_engine/ and kernels/ (installed as m3ae_engine.kernels)."""
    found = {}
    for base, prefix in ((ROOT / PKG, PKG), (ROOT / "kernels", f"{PKG}.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix] + parts)] = path
    return found


def imported_modules(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Every m3ae_engine module `name` imports (at any depth of its code), resolved to a module of the
    package: `from X import y` counts as X.y when that is a module, else as X."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules or a.name == "_C" else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t == PKG or t.startswith(PKG + "."):
                while t not in modules and t.count(".") > 1 and not t.endswith("._C"):
                    t = t.rsplit(".", 1)[0]  # an attribute of a module: the module
                out.add(t)
    out.discard(name)
    return out


def folder(module: str) -> Optional[str]:
    """The layer folder of a module; None for the facade (m3ae_engine and its top-level modules)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    top = parts[1]
    if top in FOLDER_OF_TOP:
        return FOLDER_OF_TOP[top]
    return top if top in LAYER else None


def import_graph() -> Dict[str, Set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for src, targets in graph.items():
        f = folder(src)
        if f is None:
            continue  # the facade may import every layer
        for dst in targets:
            g = folder(dst)
            if g is None:
                bad.append(f"{src} imports the facade {dst}")
            elif g != f and LAYER[g] >= LAYER[f]:
                bad.append(f"{src} ({f}, layer {LAYER[f]}) imports {dst} ({g}, layer {LAYER[g]})")
    return sorted(bad)


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer_or_the_facade():
    strays = [m for m in package_modules() if folder(m) is None and m.count(".") > 1]
    assert not strays, f"modules outside every layer folder: {strays}"


def test_imports_point_down_only():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, "modules that import each other in a circle: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checks_see_what_they_guard_against():
    """The walker must find a lazy upward import and a circle when they exist (a check that cannot fail
    proves nothing)."""
    graph = {"m3ae_engine.model.m3ae": {"m3ae_engine.interop.pretrained"},
             "m3ae_engine.interop.pretrained": {"m3ae_engine.interop.convert"},
             "m3ae_engine.interop.convert": {"m3ae_engine.model.m3ae"},
             "m3ae_engine.data.sources": {"m3ae_engine.interop.convert"},
             "m3ae_engine.ops.reference": {"m3ae_engine"}}
    bad = upward_imports(graph)
    assert any("model.m3ae (model, layer 2) imports m3ae_engine.interop.pretrained" in b for b in bad)
    assert any("data.sources (data, layer 3) imports m3ae_engine.interop.convert" in b for b in bad)
    assert any("imports the facade m3ae_engine" in b for b in bad)
    assert cycles(graph) == [sorted(["m3ae_engine.model.m3ae", "m3ae_engine.interop.pretrained",
                                     "m3ae_engine.interop.convert"])]
    modules = package_modules()
    lazy = imported_modules("m3ae_engine.train.batches", modules["m3ae_engine.train.batches"], modules)
    assert "m3ae_engine.data" in lazy  # imported only inside functions there
