"""Graph passes. A pass never imports codegen, a runtime or a target; passes are registered in the
pass table (``registry.py``) and run by the pass manager (``manager.py``)."""
from .manager import PassContext, PassSpec, parse_pipeline, resolve, run_pipeline
from .registry import Option, register_pass, registered_passes

__all__ = ["Option", "PassContext", "PassSpec", "parse_pipeline", "register_pass", "registered_passes", "resolve",
           "run_pipeline"]
