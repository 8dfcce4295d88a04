"""Attention over the paged KV cache: one interface (`AttentionBackend`), two implementations
(the torch reference in torch_backend.py, Triton kernels in triton_backend.py)."""

from shardline.worker.attention.metadata import AttentionBackend, AttentionMetadata, get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
