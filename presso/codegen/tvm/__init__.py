"""TVM codegen for CPU and edge targets: lower the IR to Relax (``lower.py``), schedule the kernels
(``schedule.py``), compile with TVM into a VM executable for a ``Machine`` (``build.py``)."""
from .build import Machine, TVMBuild, build, host_cpu_target, host_requirements, load_library

__all__ = ["Machine", "TVMBuild", "build", "host_cpu_target", "host_requirements", "load_library"]
