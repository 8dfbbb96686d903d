"""presso's import graph, read from the source with ``ast`` (module-level AND function-level
imports): it has no cycle, and every import goes down the layering

    errors, deps, config, version  <  ir  <  frontend, passes  <  codegen  <  runtime  <  targets  <  api, cli, ...

(``presso.targets`` itself, the registry and the ``Target`` interface, sits just above ``ir``:
``runtime/artifact.py`` reads and writes through it; the target modules sit above runtime).
Lazy registries (the pass table, the target table) load their modules with ``importlib`` by name;
they are listed in docs/architecture.md. Cheap: parses files, imports nothing."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "presso"

# import cycles still to be removed, each with why it is still there
PENDING_CYCLES: dict = {}

RANK = {"errors": 0, "deps": 0, "config": 0, "version": 0, "ir": 1, "targets": 2, "frontend": 3, "passes": 3,
        "codegen": 4, "runtime": 5}
TOP = 7         # api, cli, report, eval, models, viz, the package itself


def _modules() -> dict[str, tuple[Path, str]]:
    """module name -> (file, package its relative imports resolve against)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            out[".".join(parts)] = (path, ".".join(parts))
        else:
            out[".".join(parts)] = (path, ".".join(parts[:-1]))
    return out


def _owner(name: str, modules) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in modules else ""


def import_graph() -> nx.DiGraph:
    """Edges importer -> imported, each with the line numbers and whether any is at module level."""
    modules = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, (path, package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                if base.startswith("presso"):
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("presso")]
            for t in targets:
                owner = _owner(t, modules)
                if owner and owner != name:
                    g.add_edge(name, owner)
                    g.edges[name, owner].setdefault("lines", []).append(node.lineno)
    return g


def rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    if parts[1] == "targets" and len(parts) > 2 and parts[2] != "base":
        return 6            # a target's module composes codegen and runtime
    return RANK.get(parts[1], TOP)


def test_presso_has_no_import_cycle():
    g = import_graph()
    cycles = [frozenset(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    new = [sorted(c) for c in cycles if c not in PENDING_CYCLES]
    assert not new, "import cycles (function-level imports count): " + "; ".join(
        " <-> ".join(c) + " via " + ", ".join(f"{a}->{b} line {g.edges[a, b]['lines']}" for a in c for b in c
                                            if g.has_edge(a, b)) for c in new)


def test_imports_go_down_the_layers():
    g = import_graph()
    bad = [f"{a} -> {b} (line {g.edges[a, b]['lines'][0]})" for a, b in g.edges if rank(b) > rank(a)]
    assert not bad, "imports up the layering frontend -> ir -> passes -> codegen -> runtime: " + "; ".join(bad)


def test_passes_never_import_runtime_or_codegen_and_ir_imports_no_pass():
    g = import_graph()
    for a, b in g.edges:
        if a.startswith("presso.passes."):
            # (the target table itself sits below the passes: ``select_kernels`` asks a target, by
            # name, for its kernel patterns; no pass imports a target's module)
            assert not b.startswith(("presso.runtime", "presso.codegen", "presso.targets.")), (a, b)
        if a.startswith("presso.ir."):
            assert not b.startswith(("presso.passes", "presso.frontend", "presso.codegen", "presso.runtime")), (a, b)


def test_the_layering_check_sees_function_level_imports():
    g = import_graph()
    assert g.has_edge("presso.api", "presso.runtime.artifact")     # only imported inside CompiledModel.save


# modules that still take their own reading of TRITON_INTERPRET at import (the Triton kernel files)
ENV_READ_PENDING = {"presso.codegen.triton.int4", "presso.codegen.triton.nibbles"}


def test_environment_is_read_in_config_only():
    readers = set()
    for name, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.add(name)
    assert readers - ENV_READ_PENDING == {"presso.config"}, sorted(readers)


def test_config_reads_the_environment_when_asked(monkeypatch, tmp_path):
    from presso import config
    from presso.runtime.cuda import cuda_device
    monkeypatch.setenv("PRESSO_CACHE_DIR", str(tmp_path))
    assert config.cache_root() == tmp_path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert config.triton_interpret() and cuda_device().type == "cpu"
    monkeypatch.setenv("PRESSO_ARTIFACT_KEY", "")
    assert config.artifact_key() is None
