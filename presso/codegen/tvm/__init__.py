"""TVM codegen for CPU and edge targets: lower the IR to Relax (``lower.py``), schedule the kernels
(``schedule.py``), compile with TVM into a VM executable (``build.py``)."""
from .build import TVM_TARGETS, TVMBuild, build, can_run_here, load_library, target_for

__all__ = ["TVM_TARGETS", "TVMBuild", "build", "can_run_here", "load_library", "target_for"]
