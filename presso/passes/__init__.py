"""Graph passes. A pass never imports codegen."""
from .manager import (Option, PassContext, PassSpec, parse_pipeline, register_pass, registered_passes, resolve,
                      run_pipeline)

__all__ = ["Option", "PassContext", "PassSpec", "parse_pipeline", "register_pass", "registered_passes", "resolve",
           "run_pipeline"]
