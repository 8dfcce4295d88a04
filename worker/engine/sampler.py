"""Batched next-token sampling on the device: penalties, min_tokens, logprobs, greedy, temperature,
top-k / top-p / min-p, and seeded sampling that does not depend on the rest of the batch.

The order of operations for one step (every stage is one batched tensor op over all rows):

1. logits to fp32 (columns past `vocab_size`, e.g. a padded LM head, are dropped);
1b. logit_bias (OpenAI): each row's biases added to its token ids' logits, one scattered add over the
   batch's (row, id, bias) triples; skipped when no row has a bias;
1c. the grammar mask of constrained rows (structured outputs) sets their disallowed tokens to -inf,
   so every later stage, logprobs included, sees only what the grammar allows;
2. repetition penalty over prompt + output tokens (positive logits divided, negative multiplied);
3. frequency and presence penalties over output token counts (OpenAI: logit -= f * count + p * [count > 0]);
4. min_tokens: the row's EOS / stop token ids are set to -inf while it has fewer than min_tokens outputs;
5. logprobs, when asked, from log_softmax of these logits: after penalties and masking, before
   temperature and filtering (vLLM's "raw" logprobs, plus penalties, so they describe the model's
   distribution as this request shaped it, independent of how the sampler then truncates it);
6. greedy rows (temperature < 1e-5, i.e. 0) take the argmax of these logits;
7. other rows: divide by temperature, top-k, top-p, min-p, softmax, then the exponential race
   argmax(probs / q), q ~ Exp(1), which draws from `probs` without a CDF search. A seeded row
   draws its q from its own torch.Generator, so its tokens depend only on its seed and its own
   history, never on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardline.worker.structured.bitmask import TokenBitmask

from .outputs import TokenLogprob
from .params import SamplingParams
from .transfer import host_copy, to_device

# Temperatures below this are greedy: dividing by them would only overflow.
_GREEDY_EPS = 1e-5


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The per-request generator for a seeded request (None when unseeded). Seeds are taken
    modulo 2**64, so the validated range [-2**63, 2**64) maps onto every generator state."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    """Rows of token ids as one [N, max_len] int64 CPU tensor padded with `fill`."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), fill, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


def _token_counts(rows: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N, vocab_size] float32 counts of each token id per row (ids outside the vocab ignored)."""
    ids = to_device(_pad(rows, vocab_size), torch.int64, device)  # a blocking copy would wait for the queued forward
    ids = torch.where((ids >= 0) & (ids < vocab_size), ids, torch.full_like(ids, vocab_size))
    counts = torch.zeros((len(rows), vocab_size + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step as device tensors. Optional stages are None when no
    row uses them, so a plain greedy or temperature-only batch skips their cost entirely."""

    vocab_size: int
    temperature: torch.Tensor  # [N] float32; 1.0 on greedy rows (their sampled value is unused)
    greedy: torch.Tensor  # [N] bool
    greedy_rows: list[bool]  # the same on the host, so drawing noise needs no device sync
    all_greedy: bool
    top_k: torch.Tensor | None  # [N] int64, vocab_size where disabled
    top_p: torch.Tensor | None  # [N] float32, 1.0 where disabled
    min_p: torch.Tensor | None  # [N] float32, 0.0 where disabled
    repetition_penalty: torch.Tensor | None  # [N, 1] float32
    frequency_penalty: torch.Tensor | None  # [N, 1] float32
    presence_penalty: torch.Tensor | None  # [N, 1] float32
    seen_mask: torch.Tensor | None  # [N, V] bool: token in prompt or output (repetition penalty)
    output_counts: torch.Tensor | None  # [N, V] float32 (frequency / presence)
    min_tokens_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) to set to -inf
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # ([K] rows, [K] ids int64, [K] biases f32)
    generators: list[torch.Generator | None]
    num_logprobs: list[int | None]
    max_num_logprobs: int | None  # the largest top-n asked, None when no row asks for logprobs
    token_bitmask: TokenBitmask | None = None  # structured outputs: the constrained rows' allowed tokens

    @property
    def num_rows(self) -> int:
        return len(self.generators)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device,
        min_tokens_block: list[list[int]] | None = None,
        pending_token_ids: torch.Tensor | None = None,
    ) -> "SamplingBatch":
        """Gather the rows' parameters into tensors on `device`. `min_tokens_block[i]` are the token
        ids (EOS and stop ids) row i may not produce while it has fewer than min_tokens outputs.
        `pending_token_ids` ([N] int64 on `device`, -1 for none) is an output token per row that a
        launched step sampled but the host has not read (overlapped scheduling): the penalties
        count it without a device-to-host copy."""
        n = len(params)
        if not (len(generators) == len(prompt_token_ids) == len(output_token_ids) == n):
            raise ValueError("params, generators, prompt_token_ids and output_token_ids differ in length")
        device = torch.device(device)

        def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return to_device(values, dtype, device)

        greedy = [p.temperature < _GREEDY_EPS for p in params]
        temperature = column([1.0 if g else float(p.temperature) for p, g in zip(params, greedy)])

        def enabled_top_k(p: SamplingParams) -> bool:
            return 0 < p.top_k < vocab_size

        top_k = top_p = min_p = None
        if any(enabled_top_k(p) for p in params):
            top_k = column([p.top_k if enabled_top_k(p) else vocab_size for p in params], torch.int64)
        if any(p.top_p < 1.0 for p in params):
            top_p = column([float(p.top_p) for p in params])
        if any(p.min_p > 0.0 for p in params):
            min_p = column([float(p.min_p) for p in params])

        repetition = frequency = presence = seen = counts = None
        use_repetition = any(p.has_repetition_penalty for p in params)
        use_additive = any(p.has_additive_penalties for p in params)
        if use_repetition or use_additive:
            counts = _token_counts(output_token_ids, vocab_size, device)
            if pending_token_ids is not None:
                has = (pending_token_ids >= 0) & (pending_token_ids < vocab_size)
                ids = torch.where(has, pending_token_ids, torch.zeros_like(pending_token_ids)).unsqueeze(1)
                counts.scatter_add_(1, ids, has.to(torch.float32).unsqueeze(1))
            if use_repetition:
                repetition = column([float(p.repetition_penalty) for p in params]).unsqueeze(1)
                seen = (_token_counts(prompt_token_ids, vocab_size, device) > 0) | (counts > 0)
        if use_additive:
            frequency = column([float(p.frequency_penalty) for p in params]).unsqueeze(1)
            presence = column([float(p.presence_penalty) for p in params]).unsqueeze(1)
        else:
            counts = None

        min_tokens_index = None
        if min_tokens_block is not None:
            rows: list[int] = []
            cols: list[int] = []
            for i, (p, out, block) in enumerate(zip(params, output_token_ids, min_tokens_block)):
                if len(out) < p.min_tokens:
                    stop_ids = [t for t in block if 0 <= t < vocab_size]
                    rows.extend([i] * len(stop_ids))
                    cols.extend(stop_ids)
            if rows:
                min_tokens_index = (column(rows, torch.int64), column(cols, torch.int64))

        logit_bias = None
        if any(p.logit_bias for p in params):
            bias_rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
            bias_ids = [int(t) for p in params for t in p.logit_bias]
            bias_values = [float(v) for p in params for v in p.logit_bias.values()]
            logit_bias = (column(bias_rows, torch.int64), column(bias_ids, torch.int64), column(bias_values))

        asked = [p.logprobs for p in params]
        max_asked = max((a for a in asked if a is not None), default=None)
        return cls(
            vocab_size=vocab_size,
            temperature=temperature,
            greedy=column(greedy, torch.bool),
            greedy_rows=greedy,
            all_greedy=all(greedy),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition,
            frequency_penalty=frequency,
            presence_penalty=presence,
            seen_mask=seen,
            output_counts=counts,
            min_tokens_index=min_tokens_index,
            logit_bias=logit_bias,
            generators=list(generators),
            num_logprobs=asked,
            max_num_logprobs=max_asked,
        )


@dataclass
class LogprobTensors:
    """A step's logprobs as tensors, so that sampling reads nothing back from the device (under
    overlapped scheduling a read would wait for the step just queued). `tolist()` builds the
    per-row TokenLogprob list once the values are on the host (`to_host()`, then the step's event)."""

    token_ids: torch.Tensor  # [N] int64: the sampled tokens
    sampled: torch.Tensor  # [N] float32: their logprobs
    top_values: torch.Tensor | None  # [N, n] float32, n the largest top-n asked (None when n is 0)
    top_ids: torch.Tensor | None  # [N, n] int64
    num_logprobs: list[int | None]  # per row: its top-n, None when the row did not ask

    def to_host(self) -> "LogprobTensors":
        """The same tensors copied to pinned host memory without blocking (see host_copy)."""
        top = ((host_copy(self.top_values), host_copy(self.top_ids))
               if self.top_values is not None and self.top_ids is not None else (None, None))
        return LogprobTensors(host_copy(self.token_ids), host_copy(self.sampled), top[0], top[1], self.num_logprobs)

    def tolist(self) -> list[TokenLogprob | None]:
        """Per row, its TokenLogprob (None for rows that did not ask). Reads the tensors."""
        ids = self.token_ids.tolist()
        sampled = self.sampled.tolist()
        top_values: list[list[float]] = [[] for _ in ids]
        top_ids: list[list[int]] = [[] for _ in ids]
        if self.top_values is not None and self.top_ids is not None:
            top_values, top_ids = self.top_values.tolist(), self.top_ids.tolist()
        out: list[TokenLogprob | None] = []
        for i, n in enumerate(self.num_logprobs):
            if n is None:
                out.append(None)
                continue
            # Tokens at -inf (masked by a grammar or logit_bias) are impossible, not alternatives;
            # JSON cannot carry -inf either.
            top = {t: v for t, v in zip(top_ids[i][:n], top_values[i][:n]) if v != float("-inf")}
            out.append(TokenLogprob(token_id=ids[i], logprob=sampled[i], top=top))
        return out


@dataclass
class SamplerOutput:
    """One sampled token per row and, when any row asked, the step's logprobs still as tensors
    (`logprobs` reads them: per row a TokenLogprob, None for rows that did not ask)."""

    token_ids: torch.Tensor  # [N] int64
    logprob_tensors: LogprobTensors | None = None

    @property
    def logprobs(self) -> list[TokenLogprob | None] | None:
        """Per row its logprobs (None when no row asked). Waits for the device."""
        return self.logprob_tensors.tolist() if self.logprob_tensors is not None else None


class Sampler:
    """Turns a step's logits into one token per row (see the module docstring for the order).
    `generator` is the shared source of noise for unseeded rows (torch's default when None)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    @torch.inference_mode()  # the logits are inference tensors; masking them in place needs this mode
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = processed_logits(logits, batch)

        logprobs = None
        if batch.max_num_logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)

        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            probs = filtered_probs(logits / batch.temperature.unsqueeze(1), batch)
            sampled_ids = (probs / self._exponential_noise(probs, batch)).argmax(dim=-1)
            token_ids = torch.where(batch.greedy, greedy_ids, sampled_ids)

        return SamplerOutput(token_ids=token_ids, logprob_tensors=gather_logprobs(logprobs, token_ids, batch))

    def _exponential_noise(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """q ~ Exp(1) per row: seeded rows from their own generator, the rest from the shared one.
        Greedy rows get no draw (their generator does not advance) and q = 1."""
        n, vocab = probs.shape
        q = torch.ones_like(probs)
        greedy = batch.greedy_rows
        shared_rows = [i for i, g in enumerate(batch.generators) if g is None and not greedy[i]]
        if shared_rows:
            noise = torch.empty((len(shared_rows), vocab), dtype=probs.dtype, device=probs.device)
            noise.exponential_(generator=self.generator)
            if len(shared_rows) == n:
                q = noise
            else:
                # Built on the host, then copied without blocking: torch.tensor(..., device=cuda)
                # would synchronize the stream and so wait for the forward queued before it.
                q[to_device(shared_rows, torch.int64, probs.device)] = noise
        for i, generator in enumerate(batch.generators):
            if generator is not None and not greedy[i]:
                # A fresh [V] tensor per row: its values depend only on this generator's state.
                q[i] = torch.empty(vocab, dtype=probs.dtype, device=probs.device).exponential_(generator=generator)
        # NOTE: exponential_ may return exactly 0; 0/0 would be NaN and win the argmax.
        return q.clamp_min_(torch.finfo(probs.dtype).tiny)


def processed_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 1-4 of the module docstring: the fp32 logits every later stage (logprobs, greedy,
    temperature and filters) reads. The speculative verifier (worker/spec_decode/) shares them."""
    logits = logits[:, : batch.vocab_size].to(torch.float32)
    if batch.logit_bias is not None:
        rows, ids, biases = batch.logit_bias
        logits = logits.index_put((rows, ids), biases, accumulate=True)  # a copy: the input may be the model's
    if batch.token_bitmask is not None:
        batch.token_bitmask.apply(logits)
    logits = apply_penalties(logits, batch)
    if batch.min_tokens_index is not None:
        logits[batch.min_tokens_index] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output tokens), then frequency and presence (output counts)."""
    if batch.repetition_penalty is not None and batch.seen_mask is not None:
        penalty = batch.repetition_penalty.expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_mask, penalized, logits)
    if batch.output_counts is not None and batch.frequency_penalty is not None and batch.presence_penalty is not None:
        counts = batch.output_counts
        logits = logits - batch.frequency_penalty * counts - batch.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Softmax of temperature-scaled logits after top-k, top-p and min-p filtering, in that order.
    Each filter keeps at least the most likely token."""
    if batch.top_k is not None or batch.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if batch.top_k is not None:
            rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
            sorted_logits = sorted_logits.masked_fill(rank >= batch.top_k.unsqueeze(1), float("-inf"))
        if batch.top_p is not None:
            sorted_probs = sorted_logits.softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            # Keep the smallest prefix whose mass reaches top_p; the first token has mass_before 0.
            drop = mass_before >= batch.top_p.unsqueeze(1)
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if batch.min_p is not None:
        threshold = batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
        # No renormalization needed: the exponential race only compares ratios within a row.
    return probs


def gather_logprobs(logprobs: torch.Tensor | None, token_ids: torch.Tensor, batch: SamplingBatch) -> LogprobTensors | None:
    """The sampled token's logprob and the top-n per row, gathered on the device (nothing is read
    back here: LogprobTensors.tolist does that when the step's results are read)."""
    if logprobs is None or batch.max_num_logprobs is None:
        return None
    return token_logprobs(logprobs, token_ids, list(batch.num_logprobs))


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int | None]) -> LogprobTensors:
    """Per row of `logprobs` ([N, V], log_softmax'ed), the logprob of its token in `token_ids` ([N]
    int64) and its top-n (n the largest of `num_logprobs`, None for rows that did not ask), on the
    device. Used for sampled tokens and for prompt tokens (prompt_logprobs) alike."""
    sampled = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_values = top_ids = None
    max_n = max((n for n in num_logprobs if n is not None), default=0)
    if max_n > 0:
        top_values, top_ids = logprobs.topk(min(max_n, logprobs.shape[-1]), dim=-1)
    return LogprobTensors(token_ids, sampled, top_values, top_ids, num_logprobs)


def prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: list[int | None]) -> LogprobTensors:
    """Prompt logprobs from the model's raw logits ([E, V] fp32 of E prompt positions; row i
    predicts next_token_ids[i], the prompt's next token): no penalties, bias, grammar or
    temperature apply to a prompt (vLLM's convention)."""
    return token_logprobs(torch.log_softmax(logits.float(), dim=-1), next_token_ids, num_logprobs)
