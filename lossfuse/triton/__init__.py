"""Triton kernels, one module per loss. Imported lazily: only CUDA tensors (or TRITON_INTERPRET=1)
need them, and importing triton is not free."""
