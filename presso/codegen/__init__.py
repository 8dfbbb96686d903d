"""Code generation: Triton kernels for GPUs (``triton/``), TVM for CPU and edge targets (``tvm/``)."""
