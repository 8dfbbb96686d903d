"""The ``llvm`` target: TVM compiles the graph for this CPU into a Relax VM executable; an
artifact holds it as a shared library (``code/model.so``), loaded only from a trusted artifact."""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

from ..deps import require
from ..errors import ArtifactError, UntrustedCodeError
from .base import Target

NATIVE_CODE = "code/model.so"
DECODE_CODE = {"prefill": "code/decode_prefill.so", "step": "code/decode_step.so"}


class LLVMTarget(Target):
    name = "llvm"
    supports_generation = True

    @property
    def default_passes(self) -> tuple[str, ...]:
        """The kernel every node runs, chosen for this target's machine (``codegen/tvm/select.py``)."""
        return (f"select_kernels{{target={self.name}}}",)

    def check_available(self) -> None:
        require("tvm", "tvm", f"target={self.name!r}")

    def machine(self):
        """What TVM compiles for: this host's CPU (``-mcpu`` detected, every core)."""
        from ..codegen.tvm import Machine, host_cpu_target, host_requirements
        return Machine(self.name, host_cpu_target(), host_requirements())

    def select_kernels(self, graph):
        from ..codegen.tvm.select import select_kernels
        return select_kernels(graph, self.machine().spec)

    def build(self, graph):
        from ..codegen.tvm import build
        code = build(graph, self.machine())
        code.source_graph = graph
        return code

    def runs_here(self) -> bool:
        return True

    def generation_runtime(self, code=None):
        """The decode program's prefill and step graphs run from TVM builds kept in ``code`` (built
        on first use, or loaded from an artifact), keyed by the graph they compile, so another
        ``max_len`` gets its own (caches are updated in place: ``codegen/tvm/decode_ops.py``)."""
        if not self.runs_here():
            raise self.unavailable(f"generation {self.why_not_runnable()}")
        from ..runtime.tvm_vm import TVMRuntime
        builds = code.decode if code is not None else {}

        def make(graph):
            b = self._decode_build(builds, graph)
            return TVMRuntime(graph, b.executable, b.params)
        return make

    def _decode_build(self, builds: dict, graph):
        from ..codegen.tvm import build
        key = graph_key(graph)
        if key not in builds:
            builds[key] = build(graph, self.machine())
        return builds[key]

    def runtime(self, graph, code, device="cpu"):
        if not self.runs_here():
            return None
        from ..runtime.tvm_vm import TVMRuntime
        return TVMRuntime(graph, code.executable, code.params)

    def export(self, code, code_dir: Path) -> tuple[list[str], dict]:
        """``code/model.so``, and for a model compiled for generation the decode program's prefill
        and step libraries at its compiled ``max_len`` (built here if generation never ran), so
        that a machine that cannot compile (an Arm board) generates from the artifact."""
        code_dir.mkdir(parents=True, exist_ok=True)
        code.export(code_dir / "model.so")
        files, fields = [NATIVE_CODE], {"requires": code.requires}     # the CPU features the compiled code uses
        for kind, graph in decode_graphs(code.source_graph).items():
            self._decode_build(code.decode, graph).export(code_dir / f"decode_{kind}.so")
            files.append(DECODE_CODE[kind])
        return files, fields

    def check_artifact(self, path: Path, manifest: dict, authenticated: bool, trust_code: bool) -> None:
        """The library runs inside this process as soon as it is opened (its constructors
        included): it is opened only from an artifact a key authenticates, or when the caller
        trusts the file."""
        from ..runtime.artifact_mac import ENV_KEY
        if not self.runs_here():
            raise ArtifactError(f"{path}: compiled for {self.name}; this {platform.machine()} machine cannot run it")
        if NATIVE_CODE not in manifest["files"]:
            raise ArtifactError(f"{path}: a {self.name} artifact must hold {NATIVE_CODE}")
        from ..codegen.tvm.cpu import missing_cpu_features
        requires = manifest.get("requires") or {}
        if not isinstance(requires, dict):
            raise ArtifactError(f"{path}: the manifest's 'requires' must be an object, got {type(requires).__name__}")
        missing = missing_cpu_features(requires)
        if missing:
            raise ArtifactError(f"{path}: compiled for a {requires.get('mcpu', '?')} CPU whose code uses "
                                f"{', '.join(missing)}, which this CPU lacks; recompile the model on this machine")
        if not (authenticated or trust_code):
            raise UntrustedCodeError(
                f"{path}: refusing to load {NATIVE_CODE}: opening it runs its code, and this artifact is not "
                f"authenticated (it has no signature, and its SHA-256s only detect corruption). Either load it with "
                f"the key it was saved with (load(path, key=...) or ${ENV_KEY}; save signed artifacts with "
                f"save(path, key=...)), or, if you trust whoever could write this folder, pass "
                f"load(path, trust_code=True) (presso CLI: --trust-code)")

    def load(self, graph, path: Path, manifest: dict):
        from ..codegen.tvm import load_library
        code = load_library(graph, self.machine(), path / NATIVE_CODE)
        code.source_graph = graph
        for kind, dgraph in decode_graphs(graph).items():
            if DECODE_CODE[kind] in manifest["files"]:
                code.decode[graph_key(dgraph)] = load_library(dgraph, self.machine(), path / DECODE_CODE[kind])
        return code


def decode_graphs(graph) -> dict:
    """The decode program of a model compiled for generation, at its compiled ``max_len``:
    {"prefill": graph, "step": graph}; empty for any other model."""
    from ..passes.decode import DecodeError, build_decode_graph, specialize
    max_len = graph.meta.get("max_len")
    if max_len is None:
        return {}
    try:
        prefill, _ = build_decode_graph(graph, max_len)
    except DecodeError:
        return {}
    return {"prefill": prefill, "step": specialize(prefill, {"seq": 1})}


def graph_key(graph) -> str:
    """What a decode build is kept under: the digest of the graph's text (the same model and
    ``max_len`` give the same decode graphs, also after an artifact round trip)."""
    from ..ir.printer import print_graph
    return hashlib.sha256(print_graph(graph).encode()).hexdigest()
