"""Counters of speculative decoding, as vLLM names them: drafts (verifications of a non-empty
proposal), draft tokens, accepted tokens, and accepted tokens per proposal position. The
acceptance rate is accepted / draft tokens; the mean accepted length per draft is
1 + accepted / drafts (the target's own token included)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeDelta:
    """What the counters gained since the previous take_delta (what metrics.on_spec_decode adds)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [k] tokens accepted at position i


class SpecDecodeStats:
    """Totals and the not-yet-exported part of them; `max_k` bounds the positions tracked."""

    def __init__(self, max_k: int) -> None:
        self.total = SpecDecodeDelta(accepted_per_pos=[0] * max_k)
        self._pending = SpecDecodeDelta(accepted_per_pos=[0] * max_k)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One request's verification: `num_accepted` of its `num_draft_tokens` proposals kept."""
        if not 0 <= num_accepted <= num_draft_tokens:
            raise ValueError(f"accepted {num_accepted} of {num_draft_tokens} proposals")
        for d in (self.total, self._pending):
            d.num_drafts += 1
            d.num_draft_tokens += num_draft_tokens
            d.num_accepted_tokens += num_accepted
            for i in range(num_accepted):
                d.accepted_per_pos[i] += 1

    def take_delta(self) -> SpecDecodeDelta:
        delta = self._pending
        self._pending = SpecDecodeDelta(accepted_per_pos=[0] * len(delta.accepted_per_pos))
        return delta

    @property
    def acceptance_rate(self) -> float:
        return self.total.num_accepted_tokens / self.total.num_draft_tokens if self.total.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification of a proposal: 1 + accepted / drafts."""
        return 1.0 + self.total.num_accepted_tokens / self.total.num_drafts if self.total.num_drafts else 0.0

    def totals(self) -> dict[str, float | int]:
        """The engine's stats() entries (vLLM's metric names without the prefix)."""
        return {
            "spec_decode_num_drafts": self.total.num_drafts,
            "spec_decode_num_draft_tokens": self.total.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.total.num_accepted_tokens,
            "spec_decode_acceptance_rate": self.acceptance_rate,
            "spec_decode_mean_accepted_length": self.mean_accepted_length,
        }
