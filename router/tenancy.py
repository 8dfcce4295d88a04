"""Which prefix-cache partition a request may use (docs/security.md, "Tenant isolation").

The prefix cache is shared by everything that hashes to the same blocks, and a request learns
from `cached_tokens` and from its time to first token whether a prompt prefix was cached: a guessed
secret inside a known template can be confirmed that way. The engine keys every block hash with
the request's cache salt (worker/engine/block_manager.py), so partitions are exactly salts.

- Without tenant isolation (default): the salt is the request's own `cache_salt` field (vLLM's),
  None for most: one shared cache; anyone who sends another's salt shares its partition.
- With `tenant_isolation`: the salt is derived from the caller's authenticated identity (its API
  key's tenant, given by the ingress's auth) and a client `cache_salt` only subdivides that
  tenant's own partition; a caller without an identity gets a partition of its own per request
  (no cache hits, no leak). A tenant's `cached_tokens` then counts only hits on its own blocks.
"""

from __future__ import annotations

import hashlib
import uuid


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def cache_salt_for(tenant_isolation: bool, tenant: str | None, client_salt: str | None) -> str | None:
    """The cache salt the engine must use for a request.

    `tenant`: the authenticated caller's stable identity (e.g. its API key's name), None when the
    request is anonymous; `client_salt`: the request's own `cache_salt` field."""
    if not tenant_isolation:
        return client_salt or None
    if tenant is None:
        return f"anonymous:{uuid.uuid4().hex}"
    salt = f"tenant:{_digest(tenant)}"
    return f"{salt}:{_digest(client_salt)}" if client_salt else salt
