"""RoutingHint: the prompt as text, passed to `ReplicaGroup.generate` as its sixth positional
argument so that a text-based Ray Serve router can read it.

Ray's PrefixCacheAffinityRouter looks for the first positional argument with a `.prompt` (or
`.messages`) attribute and raises when there is none, which leaves the request pending forever
(docs/ray-serve-notes.md). The engine never reads the hint; the KV-aware router ignores it (it
hashes the token ids, args[0]). The ingress only builds one when the config's router needs it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingHint:
    """The prompt text a text-prefix router matches on (the decoded prompt for chat or token-id input)."""

    prompt: str
