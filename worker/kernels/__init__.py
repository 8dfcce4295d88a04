"""Triton kernels for the GPU fast path (testable on CPU through TRITON_INTERPRET=1)."""
