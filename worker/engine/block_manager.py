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
  the same prefix still hits the whole chain.
- KV-cache groups (`group_windows`, worker/engine/kv_cache_groups.py): a hybrid model (Gemma 2/3:
  global and windowed layers) gives each request one block table per group, all drawn from this one
  pool of ids (one id is a page in each of the group-size cache tensors). A global group's table
  grows with the context; a windowed group's releases its out-of-window blocks as above, and the
  freed ids serve any group. A step is admitted only if every group's blocks fit (one check against
  the shared free list); freeing and preemption free every group's table.
- Prefix caching per group: each group keys its own blocks (the same chained hashes, in its own
  map). A prefix hit of k blocks must be usable by every group: a global group needs all k blocks
  cached, a windowed group only those its next query can see (from the block holding position
  k * block_size - window + 1 to block k - 1; its older ones may have been evicted, and are not
  taken even if cached). The hit is the longest k every group accepts. So a windowed group's
  released blocks, kept as evictable cached blocks, still serve hits until evicted.
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
    free-list head, freeing appends, and a cache hit removes a block from the middle by id.

    `group_windows`: one entry per KV-cache group, its window (None: global); default one group
    with `release_window` (None unless every layer is windowed). Prefix hits cross the scheduler
    as one flat list: group after group, each the same length (the hit's block count)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 release_window: int | None = None, group_windows: Sequence[int | None] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        if group_windows is None:
            group_windows = (release_window,)
        elif release_window is not None:
            raise ValueError("release_window: give the windows as group_windows instead")
        if not group_windows or any(w is not None and w < 1 for w in group_windows):
            raise ValueError(f"group_windows: need one or more windows >= 1 or None, got {list(group_windows)}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.group_windows: tuple[int | None, ...] = tuple(group_windows)
        self.num_groups = len(self.group_windows)
        self.release_window = self.group_windows[0]  # group 0's window (ModelConfig.kv_release_window)
        self.num_released_blocks_total = 0
        self.ref_counts: list[int] = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._block_group: list[int] = [0] * num_blocks  # whose map holds the block's hash
        self._cached: list[dict[bytes, int]] = [{} for _ in self.group_windows]  # per group: hash -> block
        self._last_used: list[int] = [0] * num_blocks  # logical clock, for hash_summary
        self._clock = 0
        # request id -> leading blocks already cache-registered in every group
        self._num_registered: dict[str, int] = {}
        self._windowed_groups = [g for g, w in enumerate(self.group_windows) if w is not None]
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found
        self.peak_group_blocks: list[int] = [0] * self.num_groups  # most blocks each group held at once
        self._group_blocks: list[int] = [0] * self.num_groups  # blocks each group holds now

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
        return sum(len(cached) for cached in self._cached)

    def block_hash(self, block_id: int) -> bytes | None:
        """The prefix-cache key a block currently holds, or None."""
        return self._block_hash[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (first is taken first); for tests and debugging."""
        return list(self._free)

    def group_blocks_held(self) -> list[int]:
        """Blocks each group's tables reference now (a block shared by requests counts once)."""
        return list(self._group_blocks)

    def _tables(self, request: Request) -> list[list[int]]:
        """The request's block tables, one per group (adding the missing ones)."""
        while len(request.block_tables) < self.num_groups:
            request.block_tables.append([])
            request.num_released.append(0)
        return request.block_tables

    # ---- prefix cache --------------------------------------------------------------------------

    def _ensure_block_hashes(self, request: Request, num_full_blocks: int) -> None:
        """Extend request.block_hashes to cover its first `num_full_blocks` full blocks."""
        hashes = request.block_hashes
        bs = self.block_size
        blocks = (request.token_ids(i * bs, (i + 1) * bs) for i in range(len(hashes), num_full_blocks))
        hashes.extend(chain_block_hashes(hashes[-1] if hashes else None, blocks, request.cache_salt))

    def get_computed_blocks(self, request: Request, record_stats: bool = True) -> tuple[list[int], int]:
        """The longest prefix of cached full blocks every group can use (module notes), as one flat
        list (group after group, the placeholder 0 where a windowed group needs no block), and the
        tokens it covers. Never all tokens: at least one must be computed to produce logits, so the
        lookup stops at (num_tokens - 1) // block_size blocks. Counts queried and hit tokens unless
        `record_stats` is False (the scheduler records them itself once the request is admitted)."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_known_tokens - 1) // self.block_size
        self._ensure_block_hashes(request, max_blocks)
        hashes = request.block_hashes[:max_blocks]
        num_hit = max_blocks
        found: list[list[int | None]] = [[] for _ in self._cached]
        for g, window in enumerate(self.group_windows):
            if window is None:  # a global group needs every block: its run of hits bounds the rest
                run = found[g]
                for block_hash in hashes[:num_hit]:
                    block = self._cached[g].get(block_hash)
                    if block is None:
                        break
                    run.append(block)
                num_hit = len(run)
        windowed = [g for g, w in enumerate(self.group_windows) if w is not None]
        for g in windowed:
            found[g] = [self._cached[g].get(h) for h in hashes[:num_hit]]
        if windowed:
            last_missing = []  # per windowed group: [i] = the last block <= i not cached (-1: none)
            for g in windowed:
                marks, last = [], -1
                for i, b in enumerate(found[g][:num_hit]):
                    last = i if b is None else last
                    marks.append(last)
                last_missing.append(marks)
            while num_hit > 0 and any(marks[num_hit - 1] >= self.num_out_of_window_blocks(num_hit * self.block_size, g)
                                      for g, marks in zip(windowed, last_missing)):
                num_hit -= 1
        blocks = [b if b is not None else 0 for per_group in found for b in per_group[:num_hit]]
        num_hit_tokens = num_hit * self.block_size
        if record_stats:
            self.record_prefix_lookup(request.num_tokens, num_hit_tokens)
        return blocks, num_hit_tokens

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Add one lookup to the query/hit token counters."""
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that became full within its first `num_computed_tokens`
        tokens (prompt and generated alike), in every group. Idempotent. A block whose key another
        block of its group already holds stays unregistered: the first holder serves future hits.
        Only tokens whose ids are known count (a pending token's block is registered once its id
        arrives)."""
        if not self.enable_prefix_caching:
            return
        tables = request.block_tables if len(request.block_tables) == self.num_groups else self._tables(request)
        # every group's table has the same length (placeholders included)
        num_full = min(num_computed_tokens, request.num_known_tokens, len(tables[0]) * self.block_size)
        num_full //= self.block_size
        registered = self._num_registered.get(request.request_id, 0)
        if num_full <= registered:
            return
        self._ensure_block_hashes(request, num_full)
        for g, table in enumerate(tables):
            cached = self._cached[g]
            # Released blocks may already serve another request: never register them.
            for i in range(max(registered, request.num_released[g]), num_full):
                block = table[i]
                if self._block_hash[block] is not None:
                    continue  # a prefix-cache hit: already registered
                block_hash = request.block_hashes[i]
                if block_hash not in cached:
                    cached[block_hash] = block
                    self._block_hash[block] = block_hash
                    self._block_group[block] = g
        self._num_registered[request.request_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forget every cached key. Refused (False) while any block is referenced, since running
        requests' blocks would otherwise lose their keys mid-flight."""
        if len(self._free) != self.num_blocks:
            return False
        for cached in self._cached:
            cached.clear()
        self._block_hash = [None] * self.num_blocks
        return True

    def cached_block_hashes(self) -> set[bytes]:
        """Every key group 0 (a global group, if the model has one) can serve right now."""
        return set(self._cached[0])

    def hash_summary(self, max_entries: int) -> list[bytes]:
        """Up to `max_entries` of group 0's cached keys, most recently used first: the compact view
        of this replica's cache that the router matches prompts against."""
        if max_entries <= 0:
            return []
        top = heapq.nlargest(max_entries, self._cached[0].items(), key=lambda item: self._last_used[item[1]])
        return [block_hash for block_hash, _ in top]

    # ---- allocation ----------------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def allocate_slots(self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()) -> bool:
        """Make every block table of the request cover num_computed_tokens + (hit blocks) *
        block_size + num_new_tokens tokens: take references on the cache hits
        (`new_computed_blocks`, get_computed_blocks' flat list), then allocate fresh blocks
        (evicting LRU cached ones). Returns False and changes nothing if the pool is short for any
        group."""
        tables = request.block_tables if len(request.block_tables) == self.num_groups else self._tables(request)
        num_hits = 0
        if new_computed_blocks:
            if len(new_computed_blocks) % self.num_groups:
                raise ValueError(f"request {request.request_id}: {len(new_computed_blocks)} hit blocks for "
                                 f"{self.num_groups} groups")
            num_hits = len(new_computed_blocks) // self.num_groups
            if any(tables):
                raise ValueError(f"request {request.request_id}: prefix-cache hits apply only to an empty block table")
        num_tokens = request.num_computed_tokens + num_hits * self.block_size + num_new_tokens
        num_needed = -(-num_tokens // self.block_size)
        num_fresh = max(0, num_needed - len(tables[0]) - num_hits)  # every table has the same length
        num_taken = num_fresh * self.num_groups
        skips = [0] * self.num_groups
        if num_hits:
            for g in range(self.num_groups):
                # In a windowed group, hits wholly before the first new token's window are not
                # taken: they enter the table as released placeholders.
                skips[g] = skip = self.num_out_of_window_blocks(num_hits * self.block_size, g)
                # Hits at ref 0 sit in the free list: taking them shrinks what fresh allocation can use.
                hits = new_computed_blocks[g * num_hits + skip : (g + 1) * num_hits]
                num_taken += sum(1 for b in hits if self.ref_counts[b] == 0)
        if num_taken > len(self._free):
            return False
        now = self._tick()
        # Every group's hits leave the free list before any fresh block is taken from it (a fresh
        # allocation for one group must not evict another group's hit).
        for g, table in enumerate(tables if num_hits else ()):
            skip = skips[g]
            if skip:
                table.extend([0] * skip)
                request.num_released[g] = skip
            for block in new_computed_blocks[g * num_hits + skip : (g + 1) * num_hits]:
                if self.ref_counts[block] == 0:
                    del self._free[block]
                    self._group_blocks[g] += 1
                self.ref_counts[block] += 1
                self._last_used[block] = now
                table.append(block)
        for g, table in enumerate(tables):
            for _ in range(num_fresh):
                block, _ = self._free.popitem(last=False)
                old_hash = self._block_hash[block]
                if old_hash is not None:  # evict: the block is about to hold other tokens
                    del self._cached[self._block_group[block]][old_hash]
                    self._block_hash[block] = None
                self.ref_counts[block] = 1
                self._block_group[block] = g
                self._last_used[block] = now
                table.append(block)
            self._group_blocks[g] += num_fresh
            if self._group_blocks[g] > self.peak_group_blocks[g]:
                self.peak_group_blocks[g] = self._group_blocks[g]
        if num_hits:
            self._num_registered[request.request_id] = num_hits
        return True

    def num_out_of_window_blocks(self, num_computed_tokens: int, group: int = 0) -> int:
        """Leading blocks of a sequence with this many computed tokens that no later query of the
        group reads (0 for a global group)."""
        window = self.group_windows[group]
        if window is None:
            return 0
        return max(0, num_computed_tokens - window + 1) // self.block_size

    def max_blocks_held(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a sequence of up to num_tokens tokens holds at once (all groups) when
        each step adds at most max_step_tokens: a global group all of them, a windowed one those
        from its window's first block to its newest (plus one for alignment)."""
        whole = -(-num_tokens // self.block_size)
        held = 0
        for window in self.group_windows:
            if window is None:
                held += whole
            else:
                held += min(whole, -(-(window - 1 + max_step_tokens) // self.block_size) + 1)
        return held

    def max_tokens_held(self, max_step_tokens: int) -> int | None:
        """The longest sequence whose blocks (max_blocks_held) fit the whole pool, in tokens; None
        when every group is windowed (a sequence then holds a bounded number of blocks)."""
        if all(w is not None for w in self.group_windows):
            return None
        lo, hi = 0, self.num_blocks * self.block_size  # max_blocks_held(n) >= ceil(n / block_size)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.max_blocks_held(mid, max_step_tokens) <= self.num_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def release_out_of_window(self, request: Request) -> int:
        """Release, in each windowed group, the request's blocks that hold only positions before
        num_computed_tokens - window + 1, the oldest key its next query can see (a no-op for global
        groups). Their table entries become 0; returns how many blocks were released now."""
        if not self._windowed_groups:
            return 0
        released = 0
        now = 0
        tables = self._tables(request)
        for g in self._windowed_groups:
            table = tables[g]
            end = min(self.num_out_of_window_blocks(request.num_computed_tokens, g), len(table))
            begin = request.num_released[g]
            if end <= begin:
                continue
            now = now or self._tick()
            for i in range(begin, end):
                self._drop_reference(table[i], now, g)
                table[i] = 0
            request.num_released[g] = end
            released += end - begin
        self.num_released_blocks_total += released
        return released

    def _drop_reference(self, block: int, now: int, group: int) -> None:
        """One reference fewer; at zero the block joins the free list (cached: tail, else head)."""
        self.ref_counts[block] -= 1
        if self.ref_counts[block] < 0:
            raise RuntimeError(f"block {block} freed more often than allocated")
        if self.ref_counts[block] == 0:
            self._group_blocks[group] -= 1
            self._last_used[block] = now
            self._free[block] = None
            if self._block_hash[block] is None:
                self._free.move_to_end(block, last=False)

    def trim_blocks(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past the first ceil(num_tokens / block_size) in every group
        (speculative decoding's rollback: blocks only rejected proposals used). Such blocks were
        never registered in the prefix cache (only known tokens' blocks are), so they go to the head."""
        registered = self._num_registered.get(request.request_id)
        now = self._tick()
        for g, table in enumerate(self._tables(request)):
            keep = max(-(-num_tokens // self.block_size), request.num_released[g])
            if len(table) <= keep:
                continue
            for block in reversed(table[keep:]):
                self._drop_reference(block, now, g)
            del table[keep:]
            if registered is not None and registered > keep:
                self._num_registered[request.request_id] = registered = keep

    def free(self, request: Request) -> None:
        """Drop the request's references and empty its block tables. Blocks reaching ref 0 keep
        their key and join the free list (see the module notes for the order)."""
        now = self._tick()
        for g, table in enumerate(self._tables(request)):
            for block in reversed(table[request.num_released[g] :]):
                self._drop_reference(block, now, g)
        request.block_tables = [[] for _ in range(self.num_groups)]
        request.num_released = [0] * self.num_groups
        self._num_registered.pop(request.request_id, None)
