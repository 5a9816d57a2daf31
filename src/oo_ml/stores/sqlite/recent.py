"""The decisions this process committed last, kept as the bytes it wrote, for the Reward
join.

A Reward reads its decision back before it learns. From the file, that read is a hop to
the reader thread and back, and a SQLite lookup: about 0.15 ms of CPU a reward, most of
it holding the GIL the event loop needs (fresh rewards over gRPC: 1.24 x a second with
this, in a same-run A/B, ADR 0025). Rewards mostly come
soon after their Score, so the store keeps its latest decision rows here, within a byte
budget (`OO_DECISION_CACHE_MB`), and decodes one when a reward asks for it: the record is
the one the file gives back (float32 arrays, the same codec), so a reward learns exactly
the same from either.

An entry is taken out when it is read, and whenever this process marks the decision
rewarded, so it answers one reward at most. It can only be stale through another process
(a worker, a replica or `oo-ml` rewarding or resetting the same decision). That needs no
check here: the reward's commit is conditional on the decision still being unrewarded
(`MarkRewarded`), so a stale entry ends in Conflict, and the engine reads the decision
again from the file (past the reward window, the engine reads the file before it refuses).
A reset in this process invalidates its user's entries at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace

from oo_ml.config import ScoringConfig
from oo_ml.domain.decisions import RewardState
from oo_ml.domain.ports import StoredDecision
from oo_ml.stores.codec import DecisionKey, decode_decision, decode_shadow_views
from oo_ml.stores.sqlite.decision_writer import DecisionRow, ShadowRow

DEFAULT_RECENT_DECISIONS_MB = ScoringConfig().decision_cache_mb
"""`OO_DECISION_CACHE_MB`'s default (some 45,000 decisions of ten candidates), for a
store opened without a configuration."""

ENTRY_OVERHEAD_BYTES = 440
"""What an entry costs beside its record's bytes: the dict slot, the entry, the key and
its strings. Measured with tracemalloc: 100,000 entries of ten candidates (302-byte
records, a distinct user each) took 737 bytes each."""

_RESETS_PRUNED_PAST = 1024  # resets remembered before the old ones are pruned

_PENDING = RewardState(None, None, "")  # the reward columns of an unrewarded decision


@dataclass(slots=True)
class _Entry:
    data: bytes  # the serialized record, as the decision writer received it
    key: DecisionKey
    views: bytes | None  # the shadows' views, once they are committed
    seq: int  # when it was kept, to tell it from a later reset of its user
    size: int


class RecentDecisions:
    """Committed decision rows by id, the oldest dropped first beyond `budget_bytes`
    (0: nothing is kept)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        # OrderedDict, not dict: dropping the oldest is O(1) however many were dropped
        # before (a plain dict's first item is found by skipping the slots emptied).
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._seq = 0
        # The seq each user was last reset at; their entries kept before it are void.
        self._reset_at: dict[str, int] = {}
        self._reset_limit = _RESETS_PRUNED_PAST

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, rows: Iterable[DecisionRow]) -> None:
        """Decision rows that were just committed."""
        if self.budget_bytes <= 0:
            return
        for decision_id, user_id, policy, created_at, _arm, _version, data in rows:
            self._seq += 1
            size = len(data) + ENTRY_OVERHEAD_BYTES
            key = DecisionKey(decision_id, user_id, policy, created_at)
            old = self._entries.pop(decision_id, None)
            if old is not None:  # a batch committed again after a lost answer
                self.bytes -= old.size
            self._entries[decision_id] = _Entry(data, key, None, self._seq, size)
            self.bytes += size
        self._evict()

    def attach(self, rows: Iterable[ShadowRow]) -> None:
        """Shadow views that were just committed beside their decisions."""
        for decision_id, views in rows:
            entry = self._entries.get(decision_id)
            if entry is not None:
                grown = len(views) - (len(entry.views) if entry.views else 0)
                self.bytes += grown
                entry.size += grown
                entry.views = views
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.budget_bytes and self._entries:
            self.bytes -= self._entries.popitem(last=False)[1].size
            self.evictions += 1
        self._prune_resets()

    def _prune_resets(self) -> None:
        if len(self._reset_at) > self._reset_limit or not self._entries:
            # Resets older than every entry can void nothing any more.
            first = next(iter(self._entries.values())).seq if self._entries else self._seq + 1
            self._reset_at = {u: s for u, s in self._reset_at.items() if s >= first}
            # Scanned again only once it doubles: a prune that frees little is not redone
            # at every reset.
            self._reset_limit = max(_RESETS_PRUNED_PAST, 2 * len(self._reset_at))

    def discard(self, decision_id: str) -> None:
        """This process is marking the decision rewarded: the row is about to change."""
        entry = self._entries.pop(decision_id, None)
        if entry is not None:
            self.bytes -= entry.size

    def forget_user(self, user_id: str) -> None:
        """The user is being reset: their pending decisions leave the file."""
        if self._entries:  # else there is nothing to void
            self._reset_at[user_id] = self._seq
            self._prune_resets()

    def take(self, decision_id: str) -> StoredDecision | None:
        """The decision as the file holds it, unrewarded; None when it is not here (or was
        kept before its user's reset). Either way it is not here any more."""
        entry = self._entries.pop(decision_id, None)
        if entry is None:
            self.misses += 1
            return None
        self.bytes -= entry.size
        if entry.seq <= self._reset_at.get(entry.key.user_id, 0):
            self.misses += 1
            return None
        record = decode_decision(entry.data, entry.key)
        if entry.views is not None:
            views, vectors = decode_shadow_views(entry.views)
            record = replace(record, shadows=views, shadow_vectors=vectors)
        self.hits += 1
        return StoredDecision(record, _PENDING)
