"""The engine's `Store` on JetStream (`OO_STATE=nats`), shared by every replica (ADR 0018).

Where each thing lives:

    KV oo_models        <policy>.<user> -> the model (`codec.encode_state`) behind a short
                        header of the decision ids whose rewards it learned last (see below);
                        revision = the KV revision; a reward is `update(last=revision)`
    stream OO_DECISIONS oo.decisions.d.<id>  the decision (`codec.encode_decision`), headers
                                             carry user, policy, time, arm and prompt;
                                             Nats-Msg-Id = the id, so a retried flush
                                             cannot log it twice
                        oo.decisions.s.<id>  the shadows' views of it
                        oo.decisions.r.<id>  its reward, written once (expected last
                                             subject sequence 0)
                        oo.decisions.x.<id>  a decision set aside, with the reason
                        Limits: OO_DECISION_RETENTION_S of age and OO_DECISION_LOG_MAX_MB.
    stream OO_LEDGER    oo.ledger.p.<policy>.<user>.<arm>      one empty message a decision
                        oo.ledger.q.<policy>.<user>            one a reward
                        oo.ledger.g.<policy>.<user>.<prompt>   a generated tip served
                        oo.ledger.h.<policy>.<user>.<prompt>   its reward (payload: value)
                        per-subject counts give a user's pulls and pending decisions
                        (`stream_info(subjects_filter=...)`), like SQLite's counters
    KV oo_tallies       <instance> -> this process's sums for the policy-level Stats: pulls,
                        rewards and reward sums per arm, per prompt, new users, and the
                        shadows' off-policy sums. One writer per key (no contention); a
                        reader adds every instance's up.
    KV oo_users         <policy>.<user> created once: counts distinct users exactly
    KV oo_resets        <user> -> when it was reset: its older pending decisions are gone
    KV oo_generations   <generation id> -> the generation's record
    KV oo_meta          the sweeper's position in the decision log

A reward is not one transaction here, so its steps are ordered to lose nothing and apply
nothing twice: first each model's compare-and-set, which records the decision id in the
model's header (a replay of the same reward finds it there and skips the model), then the
write-once reward mark, then the tallies. Two replicas racing on one reward: one model CAS
wins, the loser re-reads, finds the id and does not learn it again. A crash between the
model and the mark leaves the model taught and the decision pending: the client's retry
(or the sweeper) finds the id in the model, marks the decision, and answers "duplicate".

The policy-level tallies are statistics, written after each flush and each reward: a
replica that crashes between a commit and its tally loses that commit's counts from the
policy-level Stats, never a model or a reward.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from oo_ml.domain.decisions import RewardState
from oo_ml.domain.ports import (
    EVERY_POLICY,
    EVERY_USER,
    AddOffPolicy,
    ArmTotals,
    AttachShadows,
    Change,
    GenerationRecord,
    InsertDecision,
    MarkRewarded,
    OffPolicyTotals,
    PolicyTotals,
    PromptTotals,
    PutState,
    StoredDecision,
    StoredState,
    Write,
)
from oo_ml.domain.state import PolicyState
from oo_ml.errors import Conflict, TransientStoreError, UnreadableRecord
from oo_ml.stores.codec import (
    DecisionKey,
    decode_decision,
    decode_shadow_views,
    decode_state,
    encode_decision,
    encode_shadow_views,
    encode_state,
)
from oo_ml.stores.nats import kv as kvs
from oo_ml.stores.nats.kv import token, untoken

log = logging.getLogger(__name__)

MODELS = "oo_models"
TALLIES = "oo_tallies"
USERS = "oo_users"
RESETS = "oo_resets"
GENERATIONS = "oo_generations"
META = "oo_meta"
DECISIONS = "OO_DECISIONS"
LEDGER = "OO_LEDGER"
_D = "oo.decisions"
_L = "oo.ledger"

# The model header: magic, then how many ids follow, each 16 bytes (a decision id's hex).
_MAGIC = b"OOm1"
_RECENT_REWARDS = 64
_KNOWN_USERS_MAX = 100_000
"""Decision ids a model remembers having learned (its header): a replay of a reward whose
mark is written is caught by the write-once mark; one whose mark is not (a crash between
the model's CAS and the mark) by the header. A full header keeps only the ids whose marks
are missing (`_unmarked`), so such an id stays until its mark is written, by a retry or
the sweeper's default reward a day later. Only 64 unmarked ids in one model (64 crashes
in that window) would push the oldest out (ADR 0018, Consequences)."""
_NATS_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    asyncio.TimeoutError,
    OSError,
)


def _id_bytes(decision_id: str) -> bytes:
    try:
        raw = bytes.fromhex(decision_id)
    except ValueError:
        raw = b""
    if len(raw) == 16:
        return raw
    # Not one of ours (32 hex digits): remember a hash of it instead.
    import hashlib

    return hashlib.blake2b(decision_id.encode(), digest_size=16).digest()


def encode_model(state: PolicyState, recent: Sequence[bytes]) -> bytes:
    ids = list(recent)[-_RECENT_REWARDS:]
    return _MAGIC + struct.pack("<H", len(ids)) + b"".join(ids) + encode_state(state)


def decode_model(data: bytes) -> tuple[PolicyState, list[bytes]]:
    if not data.startswith(_MAGIC) or len(data) < 6:
        raise UnreadableRecord("model: no oo-ml model header")
    (n,) = struct.unpack_from("<H", data, 4)
    start = 6 + 16 * n
    ids = [data[6 + 16 * i : 6 + 16 * (i + 1)] for i in range(n)]
    return decode_state(data[start:]), ids


def model_key(user_id: str, policy: str) -> str:
    return f"{token(policy)}.{token(user_id)}"


@dataclass
class _Tally:
    """One process's contribution to the policy-level Stats (JSON in oo_tallies)."""

    arms: dict[str, dict[str, list[float]]]  # policy -> arm -> [pulls, rewarded, reward_sum]
    prompts: dict[str, dict[str, list[float]]]  # policy -> prompt -> [served, rewarded, sum]
    users: dict[str, int]
    ope: dict[str, dict[str, list[float]]]  # served -> shadow -> the OffPolicyTotals sums

    @classmethod
    def empty(cls) -> _Tally:
        return cls({}, {}, {}, {})

    @classmethod
    def parse(cls, data: bytes) -> _Tally:
        d = json.loads(data)
        return cls(d.get("arms", {}), d.get("prompts", {}), d.get("users", {}), d.get("ope", {}))

    def dump(self) -> bytes:
        return json.dumps(
            {"arms": self.arms, "prompts": self.prompts, "users": self.users, "ope": self.ope},
            separators=(",", ":"),
        ).encode()

    def arm(self, policy: str, arm: str) -> list[float]:
        return self.arms.setdefault(policy, {}).setdefault(arm, [0, 0, 0.0])

    def prompt(self, policy: str, prompt: str) -> list[float]:
        return self.prompts.setdefault(policy, {}).setdefault(prompt, [0, 0, 0.0])

    def add(self, other: _Tally) -> None:
        """Add another tally's sums to this one's."""
        for mine, theirs in ((self.arms, other.arms), (self.prompts, other.prompts)):
            for key, rows in theirs.items():
                for name, v in rows.items():
                    row = mine.setdefault(key, {}).setdefault(name, [0, 0, 0.0])
                    for i, x in enumerate(v):
                        row[i] += x
        for policy, n in other.users.items():
            self.users[policy] = self.users.get(policy, 0) + n
        for served, shadows in other.ope.items():
            for shadow, v in shadows.items():
                row = self.ope.setdefault(served, {}).setdefault(shadow, [0.0] * _OPE_FIELDS)
                for i, x in enumerate(v):
                    row[i] += x


_OPE_FIELDS = 10
_FOLD_ERRORS: tuple[type[BaseException], ...] = (*_NATS_ERRORS, Conflict)
_ARCHIVE = "archive"
_FOLDED_KEPT = 1000


class NatsStore:
    """The engine's `Store` on JetStream KV buckets and streams. `await open(...)`."""

    def __init__(self, nc: Client, js: JetStreamContext, buckets: dict[str, KeyValue]) -> None:
        self.nc = nc
        self.js = js
        self.models = buckets[MODELS]
        self.tallies = buckets[TALLIES]
        self.users = buckets[USERS]
        self.resets = buckets[RESETS]
        self.generations_kv = buckets[GENERATIONS]
        self.meta = buckets[META]
        # This process's tally key: a fresh one per start, so no two processes share one.
        self.instance = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._tally = _Tally.empty()
        self._tally_dirty = False
        self._tally_revision = 0
        self._tally_lock = asyncio.Lock()
        # (policy, user) pairs known to have a users-bucket entry: a hint that saves a
        # put per decision, bounded (a forgotten pair costs one idempotent put).
        self._known_users: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._sweep_seq = 0
        self.unreadable_states = 0
        # When the connection last came back (time.monotonic(); the supervisor's
        # reconnected callback sets it).
        self.reconnected_at = -float("inf")

    @property
    def away_until(self) -> float:
        return self.reconnected_at

    @classmethod
    async def open(
        cls,
        nc: Client,
        *,
        replicas: int = 1,
        retention_s: float = 30 * 86400.0,
        log_max_mb: float = 1024.0,
    ) -> NatsStore:
        """Create (or find) the buckets and streams, with `replicas` copies each."""
        js = nc.jetstream(timeout=5.0)
        buckets = {
            name: await kvs.ensure_bucket(js, name, replicas=replicas)
            for name in (MODELS, TALLIES, USERS, RESETS, META)
        }
        buckets[GENERATIONS] = await kvs.ensure_bucket(
            js, GENERATIONS, replicas=replicas, ttl_s=retention_s
        )
        await kvs.ensure_stream(
            js,
            StreamConfig(
                name=DECISIONS,
                subjects=[f"{_D}.>"],
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_age=retention_s,
                max_bytes=int(log_max_mb * 1024 * 1024),
                discard=DiscardPolicy.OLD,
                allow_direct=True,
                duplicate_window=120.0,
            ),
        )
        await kvs.ensure_stream(
            js,
            StreamConfig(
                name=LEDGER,
                subjects=[f"{_L}.>"],
                storage=StorageType.FILE,
                num_replicas=replicas,
                allow_direct=True,
                duplicate_window=120.0,
            ),
        )
        return cls(nc, js, buckets)

    # -- models ---------------------------------------------------------------------------

    async def get(self, user_id: str, policy: str) -> StoredState | None:
        found = await self._kv_get(self.models, model_key(user_id, policy))
        if found is None:
            return None
        revision, data = found
        state, _ = decode_model(data)
        return StoredState(revision, state)

    async def compare_and_set(
        self, user_id: str, policy: str, revision: int, state: PolicyState
    ) -> int | None:
        key = model_key(user_id, policy)
        recent: list[bytes] = []
        if revision:
            found = await self._kv_get(self.models, key)
            if found is None or found[0] != revision:
                return None
            recent = decode_model(found[1])[1]
        return await self._put_if(self.models, key, encode_model(state, recent), revision)

    # -- commits --------------------------------------------------------------------------

    async def commit(self, writes: Sequence[Write]) -> dict[tuple[str, str], int]:
        """Decision-log flushes (inserts and shadows' views) publish every record at once;
        a reward (a mark with its models and off-policy sums) runs in the order described
        in the module docstring. Any NATS failure is `TransientStoreError`: the caller
        retries, and retries are harmless (message ids, model headers, the write-once mark)."""
        try:
            marks = [w for w in writes if isinstance(w, MarkRewarded)]
            if marks:
                return await self._reward(writes, marks)
            await self._log(writes)
            return {}
        except (Conflict, UnreadableRecord):
            raise
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e

    async def _log(self, writes: Sequence[Write]) -> None:
        futures: list[asyncio.Future[Any]] = []
        inserted: list[InsertDecision] = []
        for w in writes:
            if isinstance(w, InsertDecision):
                r = w.record
                headers = {
                    "Nats-Msg-Id": f"d{r.decision_id}",
                    "Oo-User": r.user_id,
                    "Oo-Policy": r.policy,
                    "Oo-At": repr(r.created_at),
                    "Oo-Arm": r.chosen.arm,
                    "Oo-Prompt": r.chosen.prompt_version,
                }
                futures.append(
                    await self.js.publish_async(
                        f"{_D}.d.{r.decision_id}", encode_decision(r), headers=headers
                    )
                )
                inserted.append(w)
            elif isinstance(w, AttachShadows):
                futures.append(
                    await self.js.publish_async(
                        f"{_D}.s.{w.decision_id}",
                        encode_shadow_views(w.views, w.vectors),
                        headers={"Nats-Msg-Id": f"s{w.decision_id}"},
                    )
                )
            elif isinstance(w, PutState):
                rev = await self.compare_and_set(w.user_id, w.policy, w.revision, w.state)
                if rev is None:
                    raise Conflict(f"state of {w.user_id!r} under {w.policy!r} moved")
        await _acks(futures)
        # The ledger counts each decision once: its entries carry their own message ids,
        # so a retried flush publishes them all again and the stream drops the copies.
        # Not only for decisions acked fresh just now: a flush retried after its ledger
        # step failed (or its acks were lost) finds its decisions duplicates, and their
        # counts would never be written. The tallies count the first ack of each `p`.
        ledger: list[asyncio.Future[Any]] = []
        counted: list[int] = []  # index in `ledger` of each decision's `p` entry
        for w in inserted:
            r = w.record
            tp, tu = token(r.policy), token(r.user_id)
            counted.append(len(ledger))
            ledger.append(
                await self.js.publish_async(
                    f"{_L}.p.{tp}.{tu}.{token(r.chosen.arm)}",
                    b"",
                    headers={"Nats-Msg-Id": f"p{r.decision_id}"},
                )
            )
            if r.chosen.prompt_version:
                ledger.append(
                    await self.js.publish_async(
                        f"{_L}.g.{tp}.{tu}.{token(r.chosen.prompt_version)}",
                        b"",
                        headers={"Nats-Msg-Id": f"g{r.decision_id}"},
                    )
                )
        ledger_acks = await _acks(ledger)
        fresh = [w for w, i in zip(inserted, counted, strict=True) if not ledger_acks[i].duplicate]
        new_users = [
            w.record for w in fresh if (w.record.policy, w.record.user_id) not in self._known_users
        ]
        created = await asyncio.gather(*(self._first_seen(r.policy, r.user_id) for r in new_users))
        for w in fresh:
            r = w.record
            self._tally.arm(r.policy, r.chosen.arm)[0] += 1
            if r.chosen.prompt_version:
                self._tally.prompt(r.policy, r.chosen.prompt_version)[0] += 1
        for r, first in zip(new_users, created, strict=True):
            if first:
                self._tally.users[r.policy] = self._tally.users.get(r.policy, 0) + 1
        if fresh:
            # Written with every flush (one small put per flush, not per decision), so a
            # Stats on any replica counts every decision that was answered and flushed.
            self._tally_dirty = True
            await self._write_tally()

    async def _first_seen(self, policy: str, user_id: str) -> bool:
        """Record that the user has decisions under the policy; True the first time ever."""
        self._known_users[(policy, user_id)] = None
        if len(self._known_users) > _KNOWN_USERS_MAX:
            self._known_users.popitem(last=False)
        return await self._put_if(self.users, model_key(user_id, policy), b"1", 0) is not None

    async def _reward(
        self, writes: Sequence[Write], marks: Sequence[MarkRewarded]
    ) -> dict[tuple[str, str], int]:
        (mark,) = marks
        marker = _id_bytes(mark.decision_id)
        revisions: dict[tuple[str, str], int] = {}
        # 1. Each model, compare-and-set, remembering the decision in its header. A model
        #    that already remembers it learned this reward in an earlier attempt: skipped
        #    (and left out of the revisions, so the engine re-reads it).
        for w in writes:
            if not isinstance(w, PutState):
                continue
            key = model_key(w.user_id, w.policy)
            recent: list[bytes] = []
            if w.revision:
                found = await self._kv_get(self.models, key)
                if found is None or found[0] != w.revision:
                    raise Conflict(f"state of {w.user_id!r} under {w.policy!r} moved")
                recent = decode_model(found[1])[1]
                if marker in recent:
                    continue
                if len(recent) >= _RECENT_REWARDS:
                    recent = await self._unmarked(recent)
            rev = await self._put_if(
                self.models, key, encode_model(w.state, [*recent, marker]), w.revision
            )
            if rev is None:
                raise Conflict(f"state of {w.user_id!r} under {w.policy!r} moved")
            revisions[(w.user_id, w.policy)] = rev
        # 2. The write-once mark. Taken already: another attempt or replica rewarded it.
        found = await self._decision_msg(mark.decision_id)
        if found is None:
            raise Conflict(f"decision {mark.decision_id!r} is gone")
        headers = found.headers or {}
        policy, user_id = headers.get("Oo-Policy", ""), headers.get("Oo-User", "")
        arm, prompt = headers.get("Oo-Arm", ""), headers.get("Oo-Prompt", "")
        body = json.dumps({"r": mark.reward, "at": mark.at, "src": mark.source}).encode()
        try:
            await self.js.publish(
                f"{_D}.r.{mark.decision_id}",
                body,
                headers={"Nats-Expected-Last-Subject-Sequence": "0"},
            )
        except nats.js.errors.BadRequestError as e:
            if e.err_code in (10071, 10164):
                raise Conflict(f"decision {mark.decision_id!r} is already rewarded") from e
            raise
        # 3. The ledger and the tallies (statistics).
        tp, tu = token(policy), token(user_id)
        pubs = [
            self.js.publish(
                f"{_L}.q.{tp}.{tu}", b"", headers={"Nats-Msg-Id": f"q{mark.decision_id}"}
            )
        ]
        if prompt:
            pubs.append(
                self.js.publish(
                    f"{_L}.h.{tp}.{tu}.{token(prompt)}",
                    repr(mark.reward).encode(),
                    headers={"Nats-Msg-Id": f"h{mark.decision_id}"},
                )
            )
        await asyncio.gather(*pubs)
        t = self._tally.arm(policy, arm)
        t[1] += 1
        t[2] += mark.reward
        if prompt:
            p = self._tally.prompt(policy, prompt)
            p[1] += 1
            p[2] += mark.reward
        for w in writes:
            if isinstance(w, AddOffPolicy):
                s = self._tally.ope.setdefault(w.served, {}).setdefault(
                    w.shadow, [0.0] * _OPE_FIELDS
                )
                wt, r, dr = w.weight, w.reward, w.dr
                for i, v in enumerate(
                    (1, wt, wt * r, dr, dr * dr, r, 1, wt * wt, wt * wt * r, wt * wt * r * r)
                ):
                    s[i] += v
        self._tally_dirty = True
        await self._write_tally()
        return revisions

    async def _unmarked(self, ids: Sequence[bytes]) -> list[bytes]:
        """Of a full model header, the ids whose reward mark is not written (in order):
        those whose mark is written need no remembering, the mark catches their replays.
        An id left without its mark (a crash between the CAS and the mark) so stays in
        the header until a replay or the sweeper writes the mark, however many rewards
        the model learns meanwhile. Ids that are hashes (not oo-ml's) cannot be looked
        up and are kept, as every id is once 64 are unmarked (the oldest go first)."""
        subjects = {i: f"{_D}.r.{i.hex()}" for i in ids}
        marked = await kvs.get_many(self.nc, DECISIONS, list(subjects.values()))
        return [i for i in ids if subjects[i] not in marked]

    async def _write_tally(self) -> None:
        """Write this process's tally, if it changed. Only this process writes its key."""
        async with self._tally_lock:
            if not self._tally_dirty:
                return
            self._tally_dirty = False
            try:
                self._tally_revision = await self.tallies.put(self.instance, self._tally.dump())
            except BaseException:
                self._tally_dirty = True
                raise

    # -- decisions ------------------------------------------------------------------------

    async def _decision_msg(self, decision_id: str) -> Any:
        if not _subject_safe(decision_id):
            return None
        try:
            return await self.js.get_last_msg(DECISIONS, f"{_D}.d.{decision_id}", direct=True)
        except nats.js.errors.NotFoundError:
            return None

    async def _last(self, subject: str) -> Any:
        try:
            return await self.js.get_last_msg(DECISIONS, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None

    async def get_decision(self, decision_id: str) -> StoredDecision | None:
        try:
            msg = await self._decision_msg(decision_id)
            if msg is None:
                return None
            h = msg.headers or {}
            user_id, policy = h.get("Oo-User", ""), h.get("Oo-Policy", "")
            created_at = float(h.get("Oo-At", "0"))
            reset = await self._kv_get(self.resets, token(user_id))
            shadows, mark = await asyncio.gather(
                self._last(f"{_D}.s.{decision_id}"), self._last(f"{_D}.r.{decision_id}")
            )
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e
        if reset is not None and mark is None and created_at <= float(reset[1]):
            return None  # pending when its user was reset: gone, as in SQLite
        record = decode_decision(msg.data, DecisionKey(decision_id, user_id, policy, created_at))
        if shadows is not None:
            views, vectors = decode_shadow_views(shadows.data)
            record = replace(record, shadows=views, shadow_vectors=vectors)
        reward = RewardState(None, None, "")
        if mark is not None:
            m = json.loads(mark.data)
            reward = RewardState(float(m["r"]), float(m["at"]), str(m["src"]))
        return StoredDecision(record, reward)

    async def pulls(self, user_id: str, policy: str) -> dict[str, int]:
        prefix = f"{_L}.p.{token(policy)}.{token(user_id)}."
        counts = await self._subject_counts(LEDGER, prefix + ">")
        return {untoken(s[len(prefix) :]): n for s, n in counts.items()}

    async def pending_count(self, user_id: str, policy: str) -> int:
        tp, tu = token(policy), token(user_id)
        pulls, rewards = await asyncio.gather(
            self._subject_counts(LEDGER, f"{_L}.p.{tp}.{tu}.>"),
            self._subject_counts(LEDGER, f"{_L}.q.{tp}.{tu}"),
        )
        return max(sum(pulls.values()) - sum(rewards.values()), 0)

    async def pending_before(self, cutoff: float, limit: int) -> list[str]:
        """Decisions made before `cutoff` without a reward, walking the log from where the
        last sweep (of any replica) stopped. The shared position moves past the decisions
        that are settled (rewarded, or hidden by their user's reset) up to the first one
        it returns: that one is returned again next time unless its reward lands, so a
        sweep that fails (the broker away) loses no decision."""
        out: list[str] = []
        try:
            found = await self._kv_get(self.meta, "sweep")
            start = max(self._sweep_seq, int(found[1]) if found else 0) + 1
            seq = start
            settled_through = start - 1
            resets: dict[str, float | None] = {}
            while len(out) < limit:
                try:
                    msg = await self.js.get_msg(
                        DECISIONS, seq=seq, next=True, subject=f"{_D}.d.>", direct=True
                    )
                except nats.js.errors.NotFoundError:
                    break
                h = msg.headers or {}
                created_at = float(h.get("Oo-At", "0"))
                if created_at >= cutoff:
                    break
                decision_id = (msg.subject or "").rsplit(".", 1)[-1]
                seq = int(msg.seq or seq)
                if await self._last(f"{_D}.r.{decision_id}") is None and not (
                    created_at <= await self._reset_at(h.get("Oo-User", ""), resets)
                ):
                    out.append(decision_id)
                elif len(out) == 0:
                    settled_through = seq
                seq += 1
            if settled_through >= start:
                self._sweep_seq = settled_through
                await self.meta.put("sweep", str(settled_through).encode())
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e
        return out

    async def _reset_at(self, user_id: str, seen: dict[str, float | None]) -> float:
        """When the user was last reset (-inf: never); `seen` caches it for one scan."""
        if user_id not in seen:
            found = await self._kv_get(self.resets, token(user_id))
            seen[user_id] = float(found[1]) if found is not None else None
        at = seen[user_id]
        return -float("inf") if at is None else at

    async def set_aside(self, decision_id: str, reason: str) -> None:
        msg = await self._decision_msg(decision_id)
        if msg is None:
            return
        headers = dict(msg.headers or {})
        headers["Oo-Reason"] = reason[:500]
        headers.pop("Nats-Msg-Id", None)
        await self.js.publish(f"{_D}.x.{decision_id}", msg.data, headers=headers)
        await self.js.delete_msg(DECISIONS, int(msg.seq))

    async def reset_user(self, user_id: str) -> tuple[int, int]:
        """Delete the user's models under every policy; their pending decisions are gone
        from then on (a reset mark hides them; the log's limits delete them)."""
        tu = token(user_id)
        try:
            keys = await self._keys(MODELS, f"*.{tu}")
            pending = 0
            for key in keys:
                policy = untoken(key.split(".", 1)[0])
                pending += await self.pending_count(user_id, policy)
            await self.resets.put(tu, repr(time.time()).encode())
            for key in keys:
                await self.models.delete(key)
            for kind in ("p", "q", "g", "h"):
                await self.js.purge_stream(LEDGER, subject=f"{_L}.{kind}.*.{tu}.>")
                if kind == "q":
                    await self.js.purge_stream(LEDGER, subject=f"{_L}.q.*.{tu}")
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e
        return len(keys), pending

    async def policy_states(self, policy: str, limit: int) -> list[PolicyState]:
        """The most recently written models of a policy (for the population prior)."""
        subject = f"$KV.{MODELS}.{token(policy)}.>"
        info = await self.js.stream_info(f"KV_{MODELS}")
        last = int(info.state.last_seq or 0)
        if last == 0:
            return []
        # Read back from the end: at most `limit` keys, newest revision of each.
        start = max(1, last - 4 * limit)
        latest: dict[str, bytes] = {}
        seq = start
        while True:
            try:
                msg = await self.js.get_msg(
                    f"KV_{MODELS}", seq=seq, next=True, subject=subject, direct=True
                )
            except nats.js.errors.NotFoundError:
                break
            if msg.data:
                latest[msg.subject or ""] = msg.data
            else:
                latest.pop(msg.subject or "", None)
            seq = int(msg.seq or seq) + 1
        states = []
        for subj, data in list(latest.items())[-limit:]:
            try:
                states.append(decode_model(data)[0])
            except UnreadableRecord as e:
                self.unreadable_states += 1
                log.warning("model %s skipped: %s", subj, e)
        return states

    async def policy_totals(self, policy: str) -> PolicyTotals:
        arms: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
        users = 0
        for t in await self._all_tallies():
            for arm, v in t.arms.get(policy, {}).items():
                a = arms[arm]
                for i in range(3):
                    a[i] += v[i]
            users += t.users.get(policy, 0)
        out = [ArmTotals(a, int(v[0]), int(v[1]), float(v[2])) for a, v in sorted(arms.items())]
        pending = sum(t.pulls - t.rewarded for t in out)
        return PolicyTotals(arms=out, users=users, pending=max(pending, 0))

    async def prompt_totals(self, policy: str, user_id: str | None) -> list[PromptTotals]:
        if user_id is None:
            sums: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
            for t in await self._all_tallies():
                for prompt, v in t.prompts.get(policy, {}).items():
                    s = sums[prompt]
                    for i in range(3):
                        s[i] += v[i]
            return [
                PromptTotals(p, int(v[0]), int(v[1]), float(v[2])) for p, v in sorted(sums.items())
            ]
        tp, tu = token(policy), token(user_id)
        served = await self._subject_counts(LEDGER, f"{_L}.g.{tp}.{tu}.>")
        rewards = await self._payload_sums(f"{_L}.h.{tp}.{tu}.>")
        out = []
        for subj, n in sorted(served.items()):
            tok = subj.rsplit(".", 1)[-1]
            count, total = rewards.get(tok, (0, 0.0))
            out.append(PromptTotals(untoken(tok), n, count, total))
        return out

    async def off_policy_totals(self, served: str) -> list[OffPolicyTotals]:
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0] * _OPE_FIELDS)
        for t in await self._all_tallies():
            for shadow, v in t.ope.get(served, {}).items():
                s = sums[shadow]
                for i in range(_OPE_FIELDS):
                    s[i] += v[i]
        return [
            OffPolicyTotals(
                shadow,
                int(v[0]),
                v[1],
                v[2],
                v[3],
                v[4],
                v[5],
                int(v[6]),
                v[7],
                v[8],
                v[9],
            )
            for shadow, v in sorted(sums.items())
        ]

    async def prune_decisions(self, rewarded_before: float) -> int:
        return 0  # the stream's max_age (OO_DECISION_RETENTION_S) prunes

    async def decision_log_size(self) -> tuple[int, int]:
        info = await self.js.stream_info(DECISIONS)
        return int(info.state.messages or 0), int(info.state.bytes or 0)

    async def prune_oldest_rewarded(self, count: int) -> int:
        return 0  # the stream's max_bytes (OO_DECISION_LOG_MAX_MB) drops the oldest

    async def checkpoint(self) -> None:
        await self._write_tally()

    async def record_generation(self, g: GenerationRecord) -> None:
        body = json.dumps(
            {
                "u": g.user_id,
                "p": g.prompt_version,
                "m": g.model,
                "f": g.fallback,
                "at": g.created_at,
            }
        ).encode()
        try:
            await self.generations_kv.put(token(g.generation_id), body)
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e

    async def generations(self, ids: Sequence[str]) -> dict[str, GenerationRecord]:
        found = await asyncio.gather(*(self._kv_get(self.generations_kv, token(i)) for i in ids))
        out = {}
        for gid, entry in zip(ids, found, strict=True):
            if entry is not None:
                d = json.loads(entry[1])
                out[gid] = GenerationRecord(gid, d["u"], d["p"], d["m"], bool(d["f"]), d["at"])
        return out

    async def close(self) -> None:
        """Fold this process's tally into the shared archive and drop its key, so keys do
        not pile up with every restart (a crashed process's key stays, still counted).
        The archive remembers the folded instances: a fold retried after a crash between
        its two writes does not count twice. The connection belongs to the caller."""
        try:
            await self._write_tally()
            mine = self._tally.dump()

            async def fold(current: bytes | None) -> tuple[bytes | None, None]:
                doc = json.loads(current) if current else {}
                folded: list[str] = doc.get("folded", [])
                if self.instance in folded:
                    return None, None
                archive = _Tally.parse(current) if current else _Tally.empty()
                archive.add(_Tally.parse(mine))
                out = json.loads(archive.dump())
                out["folded"] = [*folded, self.instance][-_FOLDED_KEPT:]
                return json.dumps(out, separators=(",", ":")).encode(), None

            await kvs.update(self.tallies, _ARCHIVE, fold)
            await self.tallies.delete(self.instance)
        except _FOLD_ERRORS as e:
            log.warning("tally of %s not folded into the archive: %s", self.instance, e)

    # -- the change feed ------------------------------------------------------------------

    def change_feed(self, wanted: Callable[[str, str], bool]) -> ModelChanges:
        """Other replicas' model writes and resets, for `Models.apply`; the new model is
        decoded only when `wanted(user, policy)` (it is cached here)."""
        return ModelChanges(self, wanted)

    # -- helpers --------------------------------------------------------------------------

    async def _kv_get(self, kv: KeyValue, key: str) -> tuple[int, bytes] | None:
        try:
            return await kvs.get(kv, key)
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e

    async def _put_if(self, kv: KeyValue, key: str, value: bytes, last: int) -> int | None:
        try:
            return await kvs.put_if(kv, key, value, last)
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e

    async def _subject_counts(self, stream: str, subjects: str) -> dict[str, int]:
        try:
            info = await self.js.stream_info(stream, subjects_filter=subjects)
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e
        return dict(info.state.subjects or {})

    async def _payload_sums(self, subjects: str) -> dict[str, tuple[int, float]]:
        """Per last subject token: how many messages and the sum of their payloads."""
        sums: dict[str, tuple[int, float]] = {}
        seq = 1
        try:
            while True:
                try:
                    msg = await self.js.get_msg(
                        LEDGER, seq=seq, next=True, subject=subjects, direct=True
                    )
                except nats.js.errors.NotFoundError:
                    return sums
                tok = (msg.subject or "").rsplit(".", 1)[-1]
                n, total = sums.get(tok, (0, 0.0))
                sums[tok] = (n + 1, total + float(msg.data or b"0"))
                seq = int(msg.seq or seq) + 1
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e

    async def _keys(self, bucket: str, pattern: str) -> list[str]:
        """The live keys of a bucket matching a subject pattern, by direct gets along its
        stream (no consumer, and only the matching subjects are visited)."""
        pre = f"$KV.{bucket}."
        live: dict[str, bool] = {}
        seq = 1
        while True:
            try:
                msg = await self.js.get_msg(
                    f"KV_{bucket}", seq=seq, next=True, subject=pre + pattern, direct=True
                )
            except nats.js.errors.NotFoundError:
                break
            live[(msg.subject or "")[len(pre) :]] = bool(msg.data)
            seq = int(msg.seq or seq) + 1
        return [k for k, alive in live.items() if alive]

    async def _all_tallies(self) -> list[_Tally]:
        """Every process's tally and the archive, read key by key from the bucket's
        stream (direct gets, no consumer: a Stats must not leave consumers behind)."""
        stream, subjects = f"KV_{TALLIES}", f"$KV.{TALLIES}.>"
        latest: dict[str, bytes] = {}
        seq = 1
        try:
            await self._write_tally()  # ours first, so a Stats sees what we counted
            while True:
                try:
                    msg = await self.js.get_msg(
                        stream, seq=seq, next=True, subject=subjects, direct=True
                    )
                except nats.js.errors.NotFoundError:
                    break
                if msg.data:
                    latest[msg.subject or ""] = msg.data
                else:  # a delete marker: that process folded its tally into the archive
                    latest.pop(msg.subject or "", None)
                seq = int(msg.seq or seq) + 1
        except _NATS_ERRORS as e:
            raise TransientStoreError(f"NATS: {type(e).__name__}: {e}") from e
        return [_Tally.parse(data) for data in latest.values()]


# How long a flush waits for JetStream's acks. A publish whose message or ack was lost
# with a connection (a broker restart) would otherwise keep its future, and the decision
# log's flush, waiting forever; past this, the flush fails and is retried as a whole
# (message ids make the retry harmless).
_ACK_TIMEOUT_S = 5.0


async def _acks(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The acks of published messages, or TimeoutError after `_ACK_TIMEOUT_S`; the
    futures still waiting are cancelled (which frees their slots in nats-py's window of
    pending publishes)."""
    try:
        return list(await asyncio.wait_for(asyncio.gather(*futures), _ACK_TIMEOUT_S))
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def _subject_safe(decision_id: str) -> bool:
    return bool(decision_id) and all(c.isalnum() or c in "-_" for c in decision_id)


class ModelChanges:
    """The `ChangeFeed` of the models bucket (and resets): an ordered consumer that starts
    at the newest message, so a replica does not replay every model at start."""

    def __init__(self, store: NatsStore, wanted: Callable[[str, str], bool]) -> None:
        self.store = store
        self.wanted = wanted
        self.received = 0

    async def follow(self, apply: Callable[[Sequence[Change]], None], stop: asyncio.Event) -> None:
        js, nc = self.store.js, self.store.nc
        models_pre = f"$KV.{MODELS}."
        resets_pre = f"$KV.{RESETS}."

        async def on_model(msg: Msg) -> None:
            self.received += 1
            tp, _, tu = msg.subject[len(models_pre) :].partition(".")
            try:
                policy, user_id = untoken(tp), untoken(tu)
            except ValueError:
                return
            op = (msg.headers or {}).get("KV-Operation", "")
            if op in ("DEL", "PURGE") or not msg.data:
                apply([Change(user_id, policy, 0)])
                return
            revision = int(msg.metadata.sequence.stream)
            state = None
            if self.wanted(user_id, policy):
                try:
                    state = decode_model(msg.data)[0]
                except UnreadableRecord:
                    state = None
            apply([Change(user_id, policy, revision, state)])

        async def on_reset(msg: Msg) -> None:
            self.received += 1
            try:
                user_id = untoken(msg.subject[len(resets_pre) :])
            except ValueError:
                return
            apply([Change(user_id, EVERY_POLICY, 0)])

        subs: list[Any] = []
        reconnects = 0
        while not stop.is_set():
            try:
                if not subs:
                    # A reconnect shorter than the check below also counts as a gap.
                    reconnects = nc.stats["reconnects"]
                    for subject, cb in ((models_pre + ">", on_model), (resets_pre + ">", on_reset)):
                        subs.append(
                            await js.subscribe(
                                subject,
                                cb=cb,
                                ordered_consumer=True,
                                deliver_policy=DeliverPolicy.NEW,
                                config=ConsumerConfig(inactive_threshold=30.0),
                            )
                        )
                    # Anything written before the watch began is unknown to us.
                    apply([Change(EVERY_USER, EVERY_POLICY, 0)])
                await _wait(stop, 1.0)
                if not nc.is_connected or nc.stats["reconnects"] != reconnects:
                    raise nats.errors.ConnectionClosedError
            except _NATS_ERRORS as e:
                log.warning("model change feed interrupted: %s", e or type(e).__name__)
                for sub in subs:
                    with contextlib.suppress(*_NATS_ERRORS):
                        await sub.unsubscribe()
                subs = []
                await _wait(stop, 0.5)
        for sub in subs:
            with contextlib.suppress(*_NATS_ERRORS):
                await sub.unsubscribe()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
