"""One request's position in its grammar: an xgrammar GrammarMatcher advanced with every output
token the host knows, so the next mask can be filled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import xgrammar


class GrammarState:
    """The matcher of one request plus how many of its output tokens it has accepted.

    `advance(output_token_ids)` is idempotent: it feeds only the tokens past `num_accepted` (and
    rolls back if the output got shorter, as a rejected speculative token would make it), so the
    engine may call it both when it fills a mask (with a token still pending on the device) and
    when it reads the step's tokens. Preemption keeps a request's output tokens and so its state;
    recompute and chunked prefill do not sample and never touch it."""

    def __init__(self, compiled: "xgrammar.CompiledGrammar") -> None:
        import xgrammar as xgr

        self.matcher: Any = xgr.GrammarMatcher(compiled)
        self.num_accepted = 0
        self.rejected_token: int | None = None  # a token the grammar refused (the output is invalid)

    def advance(self, output_token_ids: list[int]) -> bool:
        """Accept the output tokens not seen yet; False (and `rejected_token` set) if one is refused."""
        if self.rejected_token is not None:
            return False
        if len(output_token_ids) < self.num_accepted:
            self.matcher.rollback(self.num_accepted - len(output_token_ids))
            self.num_accepted = len(output_token_ids)
        for token_id in output_token_ids[self.num_accepted:]:
            if not self.matcher.accept_token(token_id):
                self.rejected_token = token_id
                return False
            self.num_accepted += 1
        return True

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: the request is done."""
        return bool(self.matcher.is_terminated())

    @property
    def can_fill(self) -> bool:
        """Whether a next-token mask exists (not after termination or a refused token)."""
        return self.rejected_token is None and not self.is_terminated

    def fill(self, bitmask: Any, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (an int32 CPU tensor, 32 tokens a word)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
