"""The block manager owns the paged KV pool: which blocks are free, who references which, and the
prefix cache that lets a request reuse full blocks another request (or its own earlier life)
already computed.

Design:
- Every block is usable; there is no reserved null block. Block tables are padded with 0 by the
  model runner, which is harmless: attention never reads past a sequence's length and padded
  tokens are written to slot -1 (nowhere).
- A full block is keyed by `hash_block(parent_hash, its token ids, cache_salt)`: SHA-256 over a
  canonical byte encoding, chained so a block's key names its whole prefix. The router calls the
  same function (or `hash_prompt_blocks`) on prompts to find where their prefix is cached.
- Reference counts live in a list. Blocks at ref 0 sit in one free list (an OrderedDict used as a
  doubly linked list in LRU order: head evicted first). Freed blocks keep their hash and stay
  hittable until a fresh allocation takes them from the head, which drops the hash.
- A request's freed blocks go to the tail in reverse order, so its last blocks (the least shared
  part of a prefix) are evicted before its first ones. Freed blocks that hold no hash go to the
  head instead: they carry nothing worth keeping, so they are reused before any cached block.
- Sliding windows (`release_window`, set when every layer of the model is windowed): a running
  request's blocks that lie wholly before the oldest key its next query can see are released at
  each schedule (`release_out_of_window`), so a long decode holds about window / block_size + 1
  blocks instead of its whole context. Released blocks are a prefix of the block table; their
  entries become the placeholder 0 (attention never reads them: both backends start at the window).
  Prefix-cache hits wholly before the new tokens' window are not taken at all (they enter the
  table as released placeholders), so a request never holds more than
  `max_blocks_held` blocks, and a context longer than the whole pool can run.
  A released block keeps its prefix-cache key and joins the free list like any freed block (cached
  ones at the tail, stay hittable until evicted; uncached ones at the head): a later request with
  the same prefix still hits the whole chain. Models with some global layer (Gemma 2/3) release
  nothing: a block shared by all layers is needed as long as any layer reads it.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from shardline.worker.engine.request import Request


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_key: str | None) -> bytes:
    """The prefix-cache key of one full block: SHA-256 over (parent key, cache salt, token ids),
    encoded canonically (length-prefixed fields, little-endian int64 tokens). Never Python hash()."""
    h = hashlib.sha256()
    if parent is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + struct.pack("<I", len(parent)) + parent)
    if extra_key is None:
        h.update(b"\x00")
    else:
        salt = extra_key.encode("utf-8")
        h.update(b"\x01" + struct.pack("<I", len(salt)) + salt)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    return h.digest()


def chain_block_hashes(parent: bytes | None, blocks: Iterable[Sequence[int]], extra_key: str | None) -> Iterator[bytes]:
    """The chained key of each block in turn, starting below `parent` (None: the first block)."""
    for block in blocks:
        parent = hash_block(parent, block, extra_key)
        yield parent


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int, extra_key: str | None = None) -> list[bytes]:
    """Chained keys of every full block of a token sequence, as the engine computes them."""
    starts = range(0, len(token_ids) - block_size + 1, block_size)
    return list(chain_block_hashes(None, (token_ids[s : s + block_size] for s in starts), extra_key))


class BlockManager:
    """Allocates and frees KV blocks for requests and keeps the prefix cache over full blocks.

    All operations the scheduler calls each step are O(blocks touched): allocation pops the
    free-list head, freeing appends, and a cache hit removes a block from the middle by id."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 release_window: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        if release_window is not None and release_window < 1:
            raise ValueError(f"release_window: must be >= 1 or None, got {release_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.release_window = release_window  # ModelConfig.kv_release_window: None keeps every block
        self.num_released_blocks_total = 0
        self.ref_counts: list[int] = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> the block holding it
        self._last_used: list[int] = [0] * num_blocks  # logical clock, for hash_summary
        self._clock = 0
        self._num_registered: dict[str, int] = {}  # request id -> leading blocks already cache-registered
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ---- pool state ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references, cached-but-unreferenced ones included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def block_hash(self, block_id: int) -> bytes | None:
        """The prefix-cache key a block currently holds, or None."""
        return self._block_hash[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (first is taken first); for tests and debugging."""
        return list(self._free)

    # ---- prefix cache --------------------------------------------------------------------------

    def _ensure_block_hashes(self, request: Request, num_full_blocks: int) -> None:
        """Extend request.block_hashes to cover its first `num_full_blocks` full blocks."""
        hashes = request.block_hashes
        bs = self.block_size
        blocks = (request.token_ids(i * bs, (i + 1) * bs) for i in range(len(hashes), num_full_blocks))
        hashes.extend(chain_block_hashes(hashes[-1] if hashes else None, blocks, request.cache_salt))

    def get_computed_blocks(self, request: Request, record_stats: bool = True) -> tuple[list[int], int]:
        """The longest run of cached full blocks prefixing the request's tokens and the tokens they
        cover. Never all tokens: at least one must be computed to produce logits, so the lookup
        stops at (num_tokens - 1) // block_size blocks. Counts queried and hit tokens unless
        `record_stats` is False (the scheduler records them itself once the request is admitted)."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_known_tokens - 1) // self.block_size
        self._ensure_block_hashes(request, max_blocks)
        blocks: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        num_hit_tokens = len(blocks) * self.block_size
        if record_stats:
            self.record_prefix_lookup(request.num_tokens, num_hit_tokens)
        return blocks, num_hit_tokens

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Add one lookup to the query/hit token counters."""
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that became full within its first `num_computed_tokens`
        tokens (prompt and generated alike). Idempotent. A block whose key another block already
        holds stays unregistered: the first holder serves future hits. Only tokens whose ids are
        known count (a pending token's block is registered once its id arrives)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens, request.num_known_tokens, len(request.block_ids) * self.block_size)
        num_full //= self.block_size
        # Released blocks may already serve another request: never register them.
        start = max(self._num_registered.get(request.request_id, 0), request.num_released_blocks)
        if num_full <= start:
            return
        self._ensure_block_hashes(request, num_full)
        for i in range(start, num_full):
            block = request.block_ids[i]
            if self._block_hash[block] is not None:
                continue  # a prefix-cache hit: already registered
            block_hash = request.block_hashes[i]
            if block_hash not in self._cached:
                self._cached[block_hash] = block
                self._block_hash[block] = block_hash
        self._num_registered[request.request_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forget every cached key. Refused (False) while any block is referenced, since running
        requests' blocks would otherwise lose their keys mid-flight."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        return True

    def cached_block_hashes(self) -> set[bytes]:
        """Every key the cache can serve right now."""
        return set(self._cached)

    def hash_summary(self, max_entries: int) -> list[bytes]:
        """Up to `max_entries` cached keys, most recently used first: the compact view of this
        replica's cache that the router matches prompts against."""
        if max_entries <= 0:
            return []
        top = heapq.nlargest(max_entries, self._cached.items(), key=lambda item: self._last_used[item[1]])
        return [block_hash for block_hash, _ in top]

    # ---- allocation ----------------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def allocate_slots(self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()) -> bool:
        """Make the request's block table cover num_computed_tokens + len(new_computed_blocks) *
        block_size + num_new_tokens tokens: take references on the cache hits, then allocate fresh
        blocks (evicting LRU cached ones). Returns False and changes nothing if the pool is short."""
        if new_computed_blocks and request.block_ids:
            raise ValueError(f"request {request.request_id}: prefix-cache hits apply only to an empty block table")
        num_tokens = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        num_needed = -(-num_tokens // self.block_size)
        num_fresh = max(0, num_needed - len(request.block_ids) - len(new_computed_blocks))
        # With a release window, hits wholly before the first new token's window are not taken: they
        # enter the table as released placeholders.
        skip = self.num_out_of_window_blocks(len(new_computed_blocks) * self.block_size)
        # Hits at ref 0 sit in the free list: taking them shrinks what fresh allocation can use.
        num_revived = sum(1 for b in new_computed_blocks[skip:] if self.ref_counts[b] == 0)
        if num_fresh + num_revived > len(self._free):
            return False
        now = self._tick()
        if skip:
            request.block_ids.extend([0] * skip)
            request.num_released_blocks = skip
        for block in new_computed_blocks[skip:]:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            self._last_used[block] = now
            request.block_ids.append(block)
        if new_computed_blocks:
            self._num_registered[request.request_id] = len(request.block_ids)
        for _ in range(num_fresh):
            block, _ = self._free.popitem(last=False)
            old_hash = self._block_hash[block]
            if old_hash is not None:  # evict: the block is about to hold other tokens
                del self._cached[old_hash]
                self._block_hash[block] = None
            self.ref_counts[block] = 1
            self._last_used[block] = now
            request.block_ids.append(block)
        return True

    def num_out_of_window_blocks(self, num_computed_tokens: int) -> int:
        """Leading blocks of a sequence with this many computed tokens that no later query reads
        (0 without a release window)."""
        if self.release_window is None:
            return 0
        return max(0, num_computed_tokens - self.release_window + 1) // self.block_size

    def max_blocks_held(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a sequence of up to num_tokens tokens holds at once when each step adds at
        most max_step_tokens: all of them, or with a release window those from its window's first
        block to its newest (plus one for alignment)."""
        whole = -(-num_tokens // self.block_size)
        if self.release_window is None:
            return whole
        return min(whole, -(-(self.release_window - 1 + max_step_tokens) // self.block_size) + 1)

    def release_out_of_window(self, request: Request) -> int:
        """Release the request's blocks that hold only positions before num_computed_tokens -
        release_window + 1, the oldest key its next query can see (a no-op without a release
        window). Their table entries become 0; returns how many blocks were released now."""
        end = min(self.num_out_of_window_blocks(request.num_computed_tokens), len(request.block_ids))
        begin = request.num_released_blocks
        if end <= begin:
            return 0
        now = self._tick()
        for i in range(begin, end):
            self._drop_reference(request.block_ids[i], now)
            request.block_ids[i] = 0
        request.num_released_blocks = end
        self.num_released_blocks_total += end - begin
        return end - begin

    def _drop_reference(self, block: int, now: int) -> None:
        """One reference fewer; at zero the block joins the free list (cached: tail, else head)."""
        self.ref_counts[block] -= 1
        if self.ref_counts[block] < 0:
            raise RuntimeError(f"block {block} freed more often than allocated")
        if self.ref_counts[block] == 0:
            self._last_used[block] = now
            self._free[block] = None
            if self._block_hash[block] is None:
                self._free.move_to_end(block, last=False)

    def trim_blocks(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past the first ceil(num_tokens / block_size) (speculative
        decoding's rollback: blocks only rejected proposals used). Such blocks were never
        registered in the prefix cache (only known tokens' blocks are), so they go to the head."""
        keep = max(-(-num_tokens // self.block_size), request.num_released_blocks)
        if len(request.block_ids) <= keep:
            return
        for block in reversed(request.block_ids[keep:]):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            if self.ref_counts[block] == 0:
                self._free[block] = None
                self._free.move_to_end(block, last=self._block_hash[block] is not None)
        del request.block_ids[keep:]
        registered = self._num_registered.get(request.request_id)
        if registered is not None and registered > keep:
            self._num_registered[request.request_id] = keep

    def free(self, request: Request) -> None:
        """Drop the request's references and empty its block table. Blocks reaching ref 0 keep
        their key and join the free list (see the module notes for the order)."""
        now = self._tick()
        for block in reversed(request.block_ids[request.num_released_blocks :]):
            self._drop_reference(block, now)
        request.block_ids = []
        request.num_released_blocks = 0
        self._num_registered.pop(request.request_id, None)
