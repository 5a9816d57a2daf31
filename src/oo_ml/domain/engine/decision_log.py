"""The decision log, written behind the answer.

A Score appends its decision here and answers; a writer group-commits what is buffered
every `OO_DECISION_FLUSH_MS` (or at once when `OO_DECISION_FLUSH_RECORDS` are waiting),
in one store commit, so a thousand decisions share one fsync. This is PostgreSQL's
`synchronous_commit = off` and the Decision Service's asynchronous rank logging (ADR 0011):

- a crash loses at most the decisions of the last flush interval; a Reward naming one of
  them is NOT_FOUND, like any unknown decision;
- an acknowledged reward is never lost: a Reward first waits for its decision's commit
  (asking for an immediate flush), then commits the reward itself before answering;
- `OO_DECISION_DURABILITY=sync` keeps answer-after-fsync: Score waits for its flush.

The shadows' views ride the same group commits as rows of their own (`AttachShadows`), so
no second commit rewrites a decision. Listeners (the TipServed publisher) hear of a
decision once it is durable.

A commit that fails (a full disk) leaves the writes buffered and is retried with a
backoff; past `max_buffered` the oldest decisions are dropped, logged and counted rather
than growing memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from oo_ml.domain.decisions import DecisionRecord
from oo_ml.domain.ports import AttachShadows, InsertDecision, Store, Write
from oo_ml.errors import TransientStoreError

log = logging.getLogger(__name__)

_MAX_RETRY_S = 5.0


@dataclass
class LogCounters:
    appended: int = 0
    flushed: int = 0
    commits: int = 0
    commit_failures: int = 0
    dropped: int = 0


class DecisionLog:
    def __init__(
        self,
        store: Store,
        *,
        flush_ms: float = 5.0,
        flush_records: int = 512,
        max_buffered: int = 200_000,
        on_durable: Callable[[DecisionRecord], None] | None = None,
    ) -> None:
        self.store = store
        self.flush_s = flush_ms / 1000.0
        self.flush_records = flush_records
        self.max_buffered = max_buffered
        self.on_durable = on_durable
        self.counters = LogCounters()
        # Decisions not yet committed, by id, for the Reward join and for Stats.
        self._records: dict[str, DecisionRecord] = {}
        self._writes: list[Write] = []
        # Set when a flush is wanted now (a Reward waits, the buffer is full, closing).
        self._wake = asyncio.Event()
        # Resolved when the writes buffered before them are committed.
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._inflight = False
        # Decisions in the commit under way: never dropped (their writes are not in
        # `_writes` but in that commit, and come back here if it fails).
        self._inflight_ids: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        # When a commit last failed (time.monotonic()), for the engine's Reward.
        self.failed_at = -float("inf")

    # -- the hot path ---------------------------------------------------------------------

    def append(self, record: DecisionRecord) -> None:
        """Buffer a decision. Never waits: the writer commits it within the interval."""
        if self._closed:
            raise RuntimeError("the decision log is closed")
        self._records[record.decision_id] = record
        self._writes.append(InsertDecision(record))
        self.counters.appended += 1
        if len(self._records) >= self.flush_records:
            self._wake.set()
        if len(self._records) > self.max_buffered:
            self._drop_oldest()
        self._ensure_writer()

    def attach_shadows(self, write: AttachShadows) -> None:
        """Buffer a decision's shadow views; they ride the next group commit."""
        if not self._closed:
            self._writes.append(write)
            self._ensure_writer()

    def pending_records(self) -> Sequence[DecisionRecord]:
        """The decisions buffered, not committed yet (operators and tests)."""
        return list(self._records.values())

    async def durable(self, decision_id: str | None = None) -> None:
        """Until the decision (or, without an id, everything buffered now) is committed.
        Asks for an immediate flush instead of waiting out the interval."""
        if decision_id is not None and decision_id not in self._records:
            return  # committed already (or never logged here)
        if decision_id is None and not self._writes and not self._inflight:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        self._ensure_writer()
        await asyncio.shield(waiter)

    # -- the writer -----------------------------------------------------------------------

    def _ensure_writer(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="oo-decision-log")

    async def _run(self) -> None:
        failures = 0
        while self._writes or self._waiters:
            if not self._wake.is_set() and not self._closed:
                await self._interval()
            self._wake.clear()
            ok = await self._flush_once()
            if ok:
                failures = 0
                continue
            failures += 1
            await asyncio.sleep(min(0.05 * 2**failures, _MAX_RETRY_S))
            if self._closed and failures >= 3:
                # Closing on a store that keeps failing: close() reports the loss, and
                # nobody waits forever for a commit that will not come.
                for w in self._waiters:
                    if not w.done():
                        w.set_exception(TransientStoreError("the decision log could not commit"))
                self._waiters = []
                return

    async def _interval(self) -> None:
        """Until the flush interval is over or a flush is wanted now. A timer that sets the
        wake event, not `wait_for`: that costs a task and a cancellation per flush."""
        timer = asyncio.get_running_loop().call_later(self.flush_s, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    async def _flush_once(self) -> bool:
        writes, self._writes = self._writes, []
        waiters, self._waiters = self._waiters, []
        if not writes:
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            return True
        self._inflight = True
        self._inflight_ids = {w.record.decision_id for w in writes if isinstance(w, InsertDecision)}
        try:
            await self.store.commit(writes)
        except asyncio.CancelledError:
            # Cancelled mid-commit (the loop is being torn down): the writes go back, for
            # whoever flushes next; the stores' inserts are idempotent, so writes that
            # landed anyway land once.
            self._writes = writes + self._writes
            self._waiters = waiters + self._waiters
            raise
        except TransientStoreError as e:
            self.counters.commit_failures += 1
            self.failed_at = time.monotonic()
            # Keep the order: these come before anything buffered meanwhile.
            self._writes = writes + self._writes
            self._waiters = waiters + self._waiters
            log.error("decision log commit of %d writes failed (retrying): %s", len(writes), e)
            return False
        except Exception as e:
            # Not the store's state but one write (a bug, a duplicate id): commit them one
            # by one so the others land, and drop the bad ones with the reason.
            self.counters.commit_failures += 1
            log.error("decision log commit failed (%s); committing one by one", e)
            writes, retry = await self._one_by_one(writes)
            self._writes = retry + self._writes
        finally:
            self._inflight = False
            self._inflight_ids = set()
        self.counters.commits += 1
        durable = [w.record for w in writes if isinstance(w, InsertDecision)]
        for record in durable:
            self._records.pop(record.decision_id, None)
        self.counters.flushed += len(durable)
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if self.on_durable is not None:
            for record in durable:
                try:
                    self.on_durable(record)
                except Exception:  # a listener's bug must not stop the log
                    log.exception("decision listener failed on %s", record.decision_id)
        return True

    async def _one_by_one(self, writes: list[Write]) -> tuple[list[Write], list[Write]]:
        """(landed, to retry): a write the store refuses is dropped with its reason; one it
        could not commit for now (a transient failure) goes back to the buffer."""
        landed: list[Write] = []
        retry: list[Write] = []
        for w in writes:
            try:
                await self.store.commit([w])
            except TransientStoreError:
                retry.append(w)
            except Exception as e:
                if isinstance(w, InsertDecision):
                    self._records.pop(w.record.decision_id, None)
                self.counters.dropped += 1
                log.error("decision log write dropped: %s: %s", type(w).__name__, e)
            else:
                landed.append(w)
        return landed, retry

    def _drop_oldest(self) -> None:
        # A tenth of the cap at once, so that a store that stays down costs one drop per
        # tenth of the buffer, not a rebuild of the buffer per Score.
        excess = len(self._records) - self.max_buffered + max(self.max_buffered // 10, 1)
        gone: set[str] = set()
        for decision_id in self._records:
            if len(gone) >= excess:
                break
            if decision_id not in self._inflight_ids:
                gone.add(decision_id)
        for decision_id in gone:
            del self._records[decision_id]
        self._writes = [
            w
            for w in self._writes
            if not (
                (isinstance(w, InsertDecision) and w.record.decision_id in gone)
                or (isinstance(w, AttachShadows) and w.decision_id in gone)
            )
        ]
        self.counters.dropped += len(gone)
        log.error(
            "decision log buffer over %d (the store is not committing): dropped %d decisions",
            self.max_buffered,
            len(gone),
        )

    async def close(self) -> None:
        """Commit what is buffered, then refuse new decisions. Idempotent."""
        self._closed = True
        self._wake.set()
        if self._writes:
            self._ensure_writer()
        if self._task is not None:
            await self._task
        if self._records:
            self.counters.dropped += len(self._records)
            log.error("decision log closed with %d decisions not committed", len(self._records))
