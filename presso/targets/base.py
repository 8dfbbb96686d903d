"""The ``Target`` interface: everything presso does that depends on where a graph runs.

``api.CompiledModel`` and ``runtime/artifact.py`` call only these methods; no code outside a
target's own module compares target names. A target is a small class in ``presso/targets/``
registered by name in ``presso/targets/__init__.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import ArtifactError, TargetUnavailableError


class Target:
    """One compilation target. Subclasses override what differs from a target with no compiled
    code that runs where it is (the reference target)."""

    name: str = ""
    #: whether ``CompiledModel.generate`` can run the decode program on this target
    supports_generation: bool = False
    #: passes this target appends after the recipe, unless the recipe already placed them
    default_passes: tuple[str, ...] = ()

    def check_available(self) -> None:
        """Raise ``TargetUnavailableError`` (or ``MissingDependencyError``) naming this target and
        why it cannot be compiled for here; called before any work."""

    def select_kernels(self, graph):
        """Rewrite ``graph`` (in place) into this target's ops, one per kernel it launches; the
        ``select_kernels`` pass calls it. By default every node stays as it is."""
        return graph

    def build(self, graph):
        """Compile ``graph``: the target's code object (None for a target that has none)."""
        return None

    def runtime(self, graph, code, device="cpu"):
        """A runtime for ``graph`` compiled to ``code`` (``run(*inputs) -> list``), or None when
        this machine cannot run the code (``why_not_runnable`` says why)."""
        raise NotImplementedError(f"target {self.name!r} defines no runtime")

    def why_not_runnable(self) -> str:
        """Why ``runtime`` returned None, and what to do instead."""
        return "this machine cannot run it"

    def unavailable(self, why: str) -> TargetUnavailableError:
        """The typed error for this target, naming it and why."""
        return TargetUnavailableError(f"target {self.name!r} {why}", target=self.name)

    def generation_runtime(self, code=None) -> Callable:
        """The runtime factory the decode program's prefill and step graphs are built with
        (``code``: the compiled model's code, for targets that keep the decode program's in it)."""
        if not self.supports_generation:
            raise self.unavailable("does not run generation (the decode program); compile for a target whose "
                                   "supports_generation is true (see presso.targets.generation_targets())")
        return lambda graph: self.runtime(graph, self.build(graph))

    def export(self, code, code_dir: Path) -> tuple[list[str], dict]:
        """Write ``code`` for an artifact under ``code_dir`` (``<artifact>/code``): the files
        written, relative to the artifact (``code/...``), and fields for the manifest."""
        return [], {}

    def check_artifact(self, path: Path, manifest: dict, authenticated: bool, trust_code: bool) -> None:
        """Refuse, with an ``ArtifactError``, an artifact this machine cannot load: called after the
        manifest's checks and before anything is parsed or run."""
        try:
            self.check_available()
        except TargetUnavailableError as e:
            raise ArtifactError(f"{path}: target {self.name!r} cannot run on this machine: {e}") from None

    def load(self, graph, path: Path, manifest: dict):
        """The code object of an artifact at ``path`` whose graph is ``graph`` (by default, built again)."""
        return self.build(graph)

    def __repr__(self):
        return f"<target {self.name}>"
