"""The `ProfileStore` on JetStream (`OO_STATE=nats`): profile features, task context and
the event-dedupe record, shared by every replica, behaving as `SqliteProfileStore` does.

Layout (`prefix` is "oo" unless a test isolates itself):

    KV bucket <prefix>_profiles       (history 1, OO_NATS_REPLICAS copies, file storage)
        u.<token(user_id)>            the user's document (`profile_doc`): day counters,
                                      completions per hour, open tasks, integration state and
                                      log, and the digests of the applied event ids and of
                                      the counted decision ids, each with its time
        total.<0..7>                  aggregate day counters for `totals(None)`, in shards
        horizon                       what the last prune forgot (days, ids, log), for the
                                      lazy pruning of documents
    stream <prefix>_applied           the applied-id index: subject <prefix>.applied.<digest>,
                                      one message per subject, value "applied_at written_at",
                                      max_age = the dedupe window + 1 h

Why one document per user: a record's effect and its dedupe mark must land together, and
a KV compare-and-set is atomic on one key only. So the document is the authority on what
was applied to the user: `record` reads it, drops what it already applied, applies the
rest and marks their ids, and writes it back with `update(..., last=revision)` (`kv.update`
retries from a fresh read when another writer got there first). Hence:

- two replicas applying the same event: both read revision r, one write wins, the other
  re-reads, finds the id marked and applies nothing (its copy answers "duplicate");
- a crash between any two writes: the effect and its mark were written together or not at
  all. The index entry, the totals and the cache are written after, and a redelivery puts
  the missing index entry back (the document says the id was applied: it is repaired, not
  re-applied).

Why a separate index too: `applied_among(ids)` and SQLite's global dedupe name event ids
without their user. The index is never ahead of the documents (written after them), so
it only ever under-reports an id, in the window between a document write and the index
write; `applied_among` then answers "not applied" for a recorded id, whose reward the
ingest asks for again (a reward is idempotent per decision) and whose `record` finds it in
the document. Before writing documents, `record` treats ids in the index as duplicates,
whoever's user they came with: an id reused for another user is a duplicate, as in
SQLite (only within the crash window above could such a reuse apply for both users). The
index is a plain stream, not a KV bucket, because KV forbids deleting a message: `prune`
purges the expired head of the stream in one request, and the stream's message count is
the number of ids remembered (`applied_events`), with no delete markers to subtract.

Totals: `totals(user)` sums the user's document. `totals(None)` must not read every
document, so each `record` adds what took effect per day to one of eight shard keys,
chosen at random (compare-and-set; eight spread the writers of several replicas), and a
read sums the eight. That addition is a write after the documents: a crash between the
two loses that batch's counts from `totals(None)` (never counts one twice); the features,
the dedupe and `totals(user)` are exact. `applied_events` is the index's message count.

Pruning is lazy for documents: `prune` raises the `horizon` key, and every later write of
a document first drops what the horizon forgets (days, ids, decisions, log entries: the
rows SQLite's prune deletes), so prune never reads every document. Reads need no horizon:
features are sums over the window. `prune` purges the index's expired head and drops old
days from the shards.

Hot path: `stored_features` answers from the cache of `CachedFeatures` (the same as the
SQLite store's); a miss reads the document and decodes its first line only. Our writes
drop their users' entries at once; other replicas' writes arrive through `follow` (a
headers-only ordered consumer on the documents' subjects, DeliverPolicy.NEW, so starting
it replays nothing), which `watch` feeds into `apply`. After the connection drops and
comes back, the feed resubscribes and reports `EVERY_USER`: every entry is forgotten.

Round trips of a batch: its index entries in one request and its documents with the
horizon in another (`kv.get_many`, a batched direct get), one compare-and-set per user
document changed, then the index entries and one shard write, each group concurrently.

Errors: a NATS failure, a timeout, or a compare-and-set that keeps losing raise
`TransientStoreError`; the ingest naks and the redelivery finishes what was not written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from oo_ml.domain.contracts import Contracts
from oo_ml.domain.events import Event
from oo_ml.domain.features import StoredValue, TaskView
from oo_ml.domain.ports import EVERY_USER, PROFILE, Change
from oo_ml.errors import Conflict, TransientStoreError, UnreadableRecord
from oo_ml.stores.nats import kv as kvs
from oo_ml.stores.nats.profile_doc import (
    Horizon,
    ProfileDoc,
    Written,
    digest,
    digest_token,
    features_at,
)
from oo_ml.stores.profile_model import (
    DAY_S,
    TOTALS,
    WINDOW_DAYS,
    CachedFeatures,
    Day,
    first_window_day,
    task_ttl,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARDS = 8
HORIZON = "horizon"
_USER = "u."
_KV_OP = "KV-Operation"
_INDEX_SLACK_S = 3600.0  # the index's max_age beyond the dedupe window: a backstop for prune
_SCAN_BATCH = 256
_FEED_POLL_S = 0.25


@contextlib.contextmanager
def _transient(what: str) -> Iterator[None]:
    """NATS failures as the ports speak of them: something a retry may fix."""
    try:
        yield
    except (nats.errors.Error, TimeoutError, OSError, Conflict) as e:
        raise TransientStoreError(f"{what}: {type(e).__name__}: {e}") from e


def _user_key(user_id: str) -> str:
    return _USER + kvs.token(user_id)


class NatsProfileStore(CachedFeatures):
    """The `ProfileStore` port (and a `ChangeFeed` of profile writes) on JetStream.

    Takes the client rather than only its JetStream context: the change feed watches the
    connection's reconnects, after which it cannot tell what it missed."""

    def __init__(
        self,
        nc: Client,
        dedupe_window_s: float,
        contracts: Contracts,
        *,
        replicas: int = 1,
        cache_s: float = 30.0,
        cache_users: int = 100_000,
        prefix: str = "oo",
        js: JetStreamContext | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        super().__init__(cache_s, cache_users)
        self.nc = nc
        self.js = js if js is not None else nc.jetstream()
        self.dedupe_window_s = dedupe_window_s
        self.replicas = replicas
        self.bucket = f"{prefix}_profiles"
        self.index_stream = f"{prefix}_applied"
        self._index_subject = f"{prefix}.applied."
        self._task_ttl_s = task_ttl(contracts)
        self.timeout_s = timeout_s  # of the batched reads (`js` has its own)
        self._kv: KeyValue | None = None
        self.feed_resets = 0

    async def ensure_schema(self) -> None:
        if self._kv is not None:
            return
        with _transient("creating the profile bucket"):
            kv = await kvs.ensure_bucket(self.js, self.bucket, replicas=self.replicas)
            await self._ensure_index()
        self._kv = kv

    async def _ensure_index(self) -> None:
        config = StreamConfig(
            name=self.index_stream,
            subjects=[self._index_subject + ">"],
            max_msgs_per_subject=1,
            max_age=self.dedupe_window_s + _INDEX_SLACK_S,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            allow_direct=True,
        )
        info = await kvs.ensure_stream(self.js, config)
        if info.config.max_age != config.max_age:
            # The dedupe window changed: the backstop follows it.
            await self.js.update_stream(info.config.evolve(max_age=config.max_age))

    async def _bucket(self) -> KeyValue:
        await self.ensure_schema()
        assert self._kv is not None
        return self._kv

    async def _get(self, key: str) -> bytes | None:
        entry = await kvs.get(await self._bucket(), key)
        return None if entry is None else entry[1]

    # -- FeatureStore / TaskSource ----------------------------------------------------------

    async def _load_features(
        self, user_id: str, now: float
    ) -> tuple[dict[str, StoredValue], float]:
        with _transient("reading a profile"):
            value = await self._get(_user_key(user_id))
        return features_at(value, now)

    async def open_tasks(self, user_id: str, now: float, limit: int) -> list[TaskView]:
        with _transient("reading a profile"):
            value = await self._get(_user_key(user_id))
        return ProfileDoc.decode(value).open_tasks(now, limit, self._task_ttl_s)

    async def integration_status(self, user_id: str, provider: str) -> tuple[str, int] | None:
        with _transient("reading a profile"):
            value = await self._get(_user_key(user_id))
        state = ProfileDoc.decode(value).integrations.get(provider)
        return None if state is None else (state[0], state[3])

    # -- writes ---------------------------------------------------------------------------

    async def applied_among(self, event_ids: Sequence[str]) -> set[str]:
        tokens = {eid: digest_token(digest(eid)) for eid in event_ids}
        with _transient("reading the applied-id index"):
            await self.ensure_schema()
            found = await self._indexed(tokens.values())
        return {eid for eid, t in tokens.items() if t in found}

    async def record(self, events: Sequence[Event], now: float) -> list[bool]:
        """Apply each event once (see the module docstring): per user, one compare-and-set
        of the document holds the effects and the ids; then the index and the totals."""
        if not events:
            return []
        first: dict[str, Event] = {}
        for e in events:
            first.setdefault(e.event_id, e)
        tokens = {eid: digest_token(digest(eid)) for eid in first}
        written: list[Written] = []
        try:
            with _transient("recording events"):
                await self.ensure_schema()
                # One round trip for the index, one for the documents and the horizon.
                users = {e.user_id: self._kv_subject(_user_key(e.user_id)) for e in first.values()}
                indexed, current = await asyncio.gather(
                    self._indexed(tokens.values()),
                    self._get_many([*users.values(), self._kv_subject(HORIZON)]),
                )
                horizon = Horizon.decode(current.get(self._kv_subject(HORIZON), (0, None))[1])
                by_user: dict[str, list[Event]] = {}
                for eid, e in first.items():
                    if tokens[eid] not in indexed:
                        by_user.setdefault(e.user_id, []).append(e)
                outcomes = await asyncio.gather(
                    *(
                        self._record_user(u, evs, now, horizon, current.get(users[u], (0, None)))
                        for u, evs in by_user.items()
                    ),
                    return_exceptions=True,
                )
                written = [w for w in outcomes if isinstance(w, Written)]
                # What landed gets its index entries and totals even when another user's
                # write failed: the redelivery will find those events applied.
                after = await asyncio.gather(
                    self._index(written, tokens, now),
                    self._add_totals(written),
                    return_exceptions=True,
                )
                for outcome in (*outcomes, *after):
                    if isinstance(outcome, BaseException):
                        raise outcome
        finally:
            # Even a failed write may have been applied (a lost answer): forget, re-read.
            self._invalidate({e.user_id for e in events})
        fresh = {eid for w in written for eid in w.fresh}
        out: list[bool] = []
        for e in events:
            out.append(e.event_id in fresh)
            fresh.discard(e.event_id)  # a later copy in the batch is a duplicate
        return out

    async def _record_user(
        self,
        user_id: str,
        events: Sequence[Event],
        now: float,
        horizon: Horizon,
        first: tuple[int, bytes | None],
    ) -> Written:
        """One compare-and-set of the user's document, from `first` (its revision and value
        read with the batch's), again from a fresh read while another writer wins."""

        async def change(current: bytes | None) -> tuple[bytes | None, Written]:
            doc = ProfileDoc.decode(current)
            doc.forget(horizon)
            done = doc.record(events, now)
            return (doc.encode() if done.fresh else None), done

        return (await self._update(_user_key(user_id), change, first))[1]

    async def _update(
        self,
        key: str,
        change: Callable[[bytes | None], Awaitable[tuple[bytes | None, T]]],
        first: tuple[int, bytes | None] | None = None,
    ) -> tuple[int, T]:
        return await kvs.update(await self._bucket(), key, change, first=first)

    def _kv_subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def _get_many(self, subjects: Sequence[str]) -> dict[str, tuple[int, bytes | None]]:
        return await kvs.get_many(self.nc, f"KV_{self.bucket}", subjects, timeout_s=self.timeout_s)

    async def _horizon(self) -> Horizon:
        return Horizon.decode(await self._get(HORIZON))

    # -- the applied-id index -------------------------------------------------------------

    async def _indexed(self, tokens: Collection[str]) -> set[str]:
        """The tokens whose ids the index holds (one request per 1024)."""
        subjects = [self._index_subject + t for t in tokens]
        found = await kvs.get_many(self.nc, self.index_stream, subjects, timeout_s=self.timeout_s)
        return {subject[len(self._index_subject) :] for subject in found}

    async def _index(self, written: Sequence[Written], tokens: dict[str, str], now: float) -> None:
        """Index the ids applied now, and put back those a crash left out (`known`)."""
        entries = [(eid, at) for w in written for eid, at in (*w.fresh.items(), *w.known.items())]
        await asyncio.gather(
            *(
                self.js.publish(
                    self._index_subject + tokens[eid],
                    f"{at!r} {now!r}".encode(),
                    stream=self.index_stream,
                )
                for eid, at in entries
            )
        )

    async def _index_size(self) -> int:
        return int((await self.js.stream_info(self.index_stream)).state.messages)

    async def _forget_ids(self, cutoff: float) -> int:
        """Drop the index entries applied before `cutoff`. The stream is in write order, so
        the scan stops at the first entry written at or after the cutoff; on the way it
        keeps the entries of producers whose clocks ran ahead (applied_at > written_at).
        The expired head goes in one purge; an expired entry behind a kept one alone."""
        if await self._index_size() == 0:
            return 0
        sub = await self.js.pull_subscribe(
            self._index_subject + ">",
            durable=None,
            stream=self.index_stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=30.0,
                mem_storage=True,
            ),
        )
        expired: list[int] = []
        keep_from: int | None = None
        try:
            done = False
            while not done:
                try:
                    msgs = await sub.fetch(_SCAN_BATCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    break
                for m in msgs:
                    seq = m.metadata.sequence.stream
                    try:
                        applied_at, written_at = map(float, m.data.split())
                    except ValueError:
                        log.warning("applied-id index entry %d does not parse: kept", seq)
                        applied_at, written_at = float("inf"), float("-inf")
                    if written_at >= cutoff:
                        keep_from = seq if keep_from is None else keep_from
                        done = True
                        break
                    if applied_at < cutoff:
                        expired.append(seq)
                    elif keep_from is None:
                        keep_from = seq
                done = done or msgs[-1].metadata.num_pending == 0
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if not expired:
            return 0
        head_end = keep_from if keep_from is not None else expired[-1] + 1
        if expired[0] < head_end:
            await self.js.purge_stream(self.index_stream, seq=head_end)
        for seq in (s for s in expired if s > head_end):
            # Best effort: the index's max_age forgets what a failed delete left.
            with contextlib.suppress(nats.js.errors.APIError):
                await self.js.delete_msg(self.index_stream, seq)
        return len(expired)

    # -- totals ---------------------------------------------------------------------------

    async def _add_totals(self, written: Sequence[Written]) -> None:
        days: dict[int, Day] = {}
        for w in written:
            for day, d in w.days.items():
                days.setdefault(day, Day()).add(d)
        if not days:
            return

        async def add(current: bytes | None) -> tuple[bytes, None]:
            shard = _decode_shard(current)
            for day, d in days.items():
                old = shard.get(day, (0.0,) * len(TOTALS))
                shard[day] = tuple(a + b for a, b in zip(old, d.counts(), strict=True))
            return _encode_shard(shard), None

        await self._update(f"total.{random.randrange(SHARDS)}", add)

    async def totals(self, user_id: str | None = None) -> dict[str, float]:
        """All-time sums of the day counters the last prune kept, and the applied-event
        count (of every user, as in SQLite). With no user, from the shards."""
        with _transient("reading the totals"):
            await self.ensure_schema()
            horizon, applied = await asyncio.gather(self._horizon(), self._index_size())
            if user_id is not None:
                doc = ProfileDoc.decode(await self._get(_user_key(user_id)))
                counts = doc.totals(horizon).counts()
            else:
                shards = await asyncio.gather(*(self._get(f"total.{i}") for i in range(SHARDS)))
                sums = [0.0] * len(TOTALS)
                for value in shards:
                    for day, row in _decode_shard(value).items():
                        if day >= horizon.day:
                            sums = [a + b for a, b in zip(sums, row, strict=True)]
                counts = tuple(sums)
        out = {name: float(v) for name, v in zip(TOTALS, counts, strict=True)}
        out["applied_events"] = float(applied)
        return out

    # -- pruning --------------------------------------------------------------------------

    async def prune(self, now: float) -> int:
        """Forget event ids past the dedupe window and days past the 30-day window (in the
        index and the shards now, in each document at its next write). Returns how many
        event ids the index forgot."""
        new = Horizon(first_window_day(now), now - self.dedupe_window_s, now - WINDOW_DAYS * DAY_S)

        async def raise_horizon(current: bytes | None) -> tuple[bytes | None, Horizon]:
            old = Horizon.decode(current)
            merged = old.merge(new)
            return (merged.encode() if merged != old else None), merged

        async def drop_days(current: bytes | None) -> tuple[bytes | None, None]:
            shard = _decode_shard(current)
            kept = {d: row for d, row in shard.items() if d >= horizon.day}
            return (_encode_shard(kept) if len(kept) < len(shard) else None), None

        with _transient("pruning"):
            horizon = (await self._update(HORIZON, raise_horizon))[1]
            forgotten = await self._forget_ids(horizon.applied)
            for i in range(SHARDS):
                await self._update(f"total.{i}", drop_days)
        return forgotten

    # -- change feed ----------------------------------------------------------------------

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep this store's feature cache fresh with every replica's writes until stop."""
        await self.follow(self.apply, stop)

    async def follow(self, apply: Callable[[Sequence[Change]], None], stop: asyncio.Event) -> None:
        """A `ChangeFeed` of profile writes: one `Change(user, PROFILE, revision)` per
        document written (by any replica, this one included), from now on. When the
        connection was lost, it subscribes again and reports `EVERY_USER`: what was
        written meanwhile is unknown."""
        prefix = f"$KV.{self.bucket}.{_USER}"
        pending: list[Change] = []
        woken = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            op = msg.headers.get(_KV_OP) if msg.headers else None
            revision = 0 if op else msg.metadata.sequence.stream
            try:
                user_id = kvs.untoken(msg.subject[len(prefix) :])
            except ValueError:
                return
            pending.append(Change(user_id, PROFILE, revision))
            woken.set()

        sub = None
        subscribed_once = False
        reconnects = -1
        try:
            while not stop.is_set():
                if not self.nc.is_connected:
                    await self._unsubscribe(sub)  # gone: subscribe again once back
                    sub = None
                elif sub is None or self.nc.stats["reconnects"] != reconnects:
                    reconnects = self.nc.stats["reconnects"]
                    await self._unsubscribe(sub)
                    sub = await self._subscribe(prefix + ">", on_msg)
                    if sub is not None:
                        if subscribed_once:
                            # Writes made while we were not subscribed are unknown.
                            self.feed_resets += 1
                            pending.append(Change(EVERY_USER, PROFILE, 0))
                        subscribed_once = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), _FEED_POLL_S)
                woken.clear()
                if pending:
                    batch, pending[:] = list(pending), []
                    apply(batch)
        finally:
            await self._unsubscribe(sub)

    async def _subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]]
    ) -> JetStreamContext.PushSubscription | None:
        """A headers-only ordered consumer of new writes; None while the server is away."""
        try:
            await self.ensure_schema()
            return await self.js.subscribe(
                subject,
                stream=f"KV_{self.bucket}",
                cb=cb,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                headers_only=True,
                inactive_threshold=30.0,
            )
        except Exception as e:  # try again at the next poll
            log.debug("profile change feed: subscribing failed: %s", e)
            return None

    @staticmethod
    async def _unsubscribe(sub: JetStreamContext.PushSubscription | None) -> None:
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be gone with it
                await sub.unsubscribe()


def _decode_shard(value: bytes | None) -> dict[int, tuple[float, ...]]:
    """A totals shard: [[day, served, feedback, completed, dismissed, snoozed, views, dwell]]."""
    if value is None:
        return {}
    try:
        return {int(r[0]): tuple(float(v) for v in r[1:]) for r in json.loads(value)}
    except (ValueError, TypeError, IndexError) as e:
        raise UnreadableRecord(f"profile totals: {type(e).__name__}: {e}") from e


def _encode_shard(shard: dict[int, tuple[float, ...]]) -> bytes:
    return json.dumps([[day, *row] for day, row in sorted(shard.items())]).encode()
