"""The ports: what the domain needs from storage, as Protocols, and the write vocabulary.

The domain owns these interfaces; the adapters in `oo_ml.stores` implement them (SQLite,
in memory). Stores take and return domain values (`PolicyState`, `DecisionRecord`) and
encode them themselves with `stores.codec`, off the event loop; the domain never sees a
proto or a byte string.

- `StateStore`: per (user, policy) state with `get` and compare-and-set on a revision.
- `Store`: a `StateStore` that also keeps the decision log and commits a list of writes
  atomically, so that a reward and the state it changes land together or not at all.
- `ProfileStore`: the ingest's profile and task tables, with exactly-once event records;
  it is also the `FeatureStore` and `TaskSource` that Score and Generate read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from oo_ml.domain.decisions import DecisionRecord, RewardState, ShadowView
from oo_ml.domain.events import Event
from oo_ml.domain.features import StoredValue, TaskView, Vector
from oo_ml.domain.state import PolicyState


@dataclass(frozen=True, slots=True)
class StoredState:
    revision: int
    state: PolicyState


@dataclass(frozen=True, slots=True)
class PutState:
    """Write state if its current revision is `revision` (0: it must not exist yet)."""

    user_id: str
    policy: str
    revision: int
    state: PolicyState


@dataclass(frozen=True, slots=True)
class InsertDecision:
    record: DecisionRecord


@dataclass(frozen=True, slots=True)
class AttachShadows:
    """The shadows' views of a logged decision, stored beside it (never rewriting it)."""

    decision_id: str
    views: tuple[ShadowView, ...]
    vectors: Mapping[str, Vector]


@dataclass(frozen=True, slots=True)
class MarkRewarded:
    """Set a decision's reward if it has none yet; otherwise the whole commit conflicts."""

    decision_id: str
    reward: float
    at: float
    source: str


@dataclass(frozen=True, slots=True)
class AddOffPolicy:
    """Add one sample's terms to a shadow's off-policy accumulators."""

    served: str
    shadow: str
    weight: float  # pi_shadow(a) / pi_served(a)
    reward: float
    dr: float  # the doubly-robust term of this sample


Write = PutState | InsertDecision | AttachShadows | MarkRewarded | AddOffPolicy


@dataclass(frozen=True, slots=True)
class StoredDecision:
    record: DecisionRecord
    reward: RewardState


@dataclass(frozen=True, slots=True)
class ArmTotals:
    arm: str
    pulls: int
    rewarded: int
    reward_sum: float


@dataclass(frozen=True, slots=True)
class PromptTotals:
    prompt_version: str
    served: int
    rewarded: int
    reward_sum: float


@dataclass(frozen=True, slots=True)
class PolicyTotals:
    arms: list[ArmTotals]
    users: int
    pending: int


@dataclass(frozen=True, slots=True)
class OffPolicyTotals:
    shadow: str
    n: int
    weight_sum: float
    weighted_reward_sum: float
    dr_sum: float
    dr_sq_sum: float
    reward_sum: float
    sq_n: int = 0
    """Samples the squared-weight sums below cover (< n for totals older than them)."""
    weight_sq_sum: float = 0.0
    weight_sq_reward_sum: float = 0.0
    weight_sq_reward_sq_sum: float = 0.0


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    """A tip Generate wrote, so a candidate naming it is attributed to its prompt version."""

    generation_id: str
    user_id: str
    prompt_version: str
    model: str
    fallback: bool
    created_at: float


PROFILE = "@profile"
"""The `Change.policy` of a write to a user's profile features or tasks (not a model)."""
EVERY_POLICY = ""
"""The `Change.policy` of a write to all the user's models at once (a reset)."""
EVERY_USER = ""
"""The `Change.user_id` when the feed lost track (it fell behind, the store was away):
every cached entry may be stale."""


@dataclass(frozen=True, slots=True)
class Change:
    """A write that some process sharing the store made (another worker or replica, or
    this one): what an in-memory cache holding the key must drop or replace.

    `policy` is a policy name, `EVERY_POLICY` (the user was reset) or `PROFILE`.
    `revision` is the model's revision after the write (0: deleted). `state` is the new
    model when the feed carries it (a NATS KV watch does), else None: re-read on use."""

    user_id: str
    policy: str
    revision: int
    state: PolicyState | None = None


class ChangeFeed(Protocol):
    """Changes to the shared store, in order, from when `follow` starts (ADR 0018)."""

    async def follow(self, apply: Callable[[Sequence[Change]], None], stop: asyncio.Event) -> None:
        """Call `apply` with each batch of changes until `stop` is set. Survives the
        store going away for a while, and then reports an `EVERY_USER` change."""
        ...


class StateStore(Protocol):
    async def get(self, user_id: str, policy: str) -> StoredState | None:
        """The state and its revision; `UnreadableRecord` if it does not decode."""
        ...

    async def compare_and_set(
        self, user_id: str, policy: str, revision: int, state: PolicyState
    ) -> int | None:
        """Store state if the current revision is `revision`; the new revision, or None."""
        ...


class MigrationStore(StateStore, Protocol):
    """What `oo-ml migrate` needs: states paged in user order, and a resumable cursor."""

    async def states_after(
        self, policy: str, after_user: str, limit: int
    ) -> list[tuple[str, StoredState | None]]:
        """Up to `limit` states of `policy` with user_id > after_user, in user_id order;
        None for one that does not decode."""
        ...

    async def migration_cursor(self, from_policy: str, to_policy: str) -> str:
        """The last user done by the (from, to) migration; "" before the first."""
        ...

    async def set_migration_cursor(
        self, from_policy: str, to_policy: str, user_id: str
    ) -> None: ...


class Store(StateStore, Protocol):
    @property
    def away_until(self) -> float:
        """`time.monotonic()` of when the store last came back from being unreachable (a
        reconnect); -inf for a store that cannot be away (an embedded file)."""
        ...

    async def commit(self, writes: Sequence[Write]) -> dict[tuple[str, str], int]:
        """Apply every write atomically and durably; raise Conflict if any condition fails.
        Returns the new revision of each state written."""
        ...

    async def get_decision(self, decision_id: str) -> StoredDecision | None:
        """The logged decision with its shadows' views; `UnreadableRecord` if it does
        not decode."""
        ...

    async def pulls(self, user_id: str, policy: str) -> dict[str, int]:
        """Decisions logged per chosen arm for the user under the policy. Kept as counters
        beside the log (a logged decision bumps its arm's), not in the model, so a Score
        never writes learned state."""
        ...

    async def pending_before(self, cutoff: float, limit: int) -> list[str]: ...

    async def set_aside(self, decision_id: str, reason: str) -> None:
        """Move an unreadable decision out of the log (kept apart, with the reason)."""
        ...

    async def reset_user(self, user_id: str) -> tuple[int, int]:
        """Delete the user's state under every policy and their pending decisions."""
        ...

    async def policy_states(self, policy: str, limit: int) -> list[PolicyState]:
        """The most recently updated states of a policy; unreadable ones are skipped."""
        ...

    async def policy_totals(self, policy: str) -> PolicyTotals: ...

    async def prompt_totals(self, policy: str, user_id: str | None) -> list[PromptTotals]: ...

    async def off_policy_totals(self, served: str) -> list[OffPolicyTotals]: ...

    async def pending_count(self, user_id: str, policy: str) -> int: ...

    async def prune_decisions(self, rewarded_before: float) -> int:
        """Forget decisions rewarded before the given time; pending ones are kept."""
        ...

    async def decision_log_size(self) -> tuple[int, int]:
        """Decisions in the log, and the bytes they take on disk (indexes included)."""
        ...

    async def prune_oldest_rewarded(self, count: int) -> int:
        """Forget up to `count` rewarded decisions, oldest reward first."""
        ...

    async def checkpoint(self) -> None:
        """Fold the store's journal into its files (a no-op where there is none)."""
        ...

    async def record_generation(self, g: GenerationRecord) -> None: ...

    async def generations(self, ids: Sequence[str]) -> dict[str, GenerationRecord]: ...

    async def close(self) -> None: ...


class ProfileStore(Protocol):
    """The ingest's tables: exactly-once event records and the profile and task features
    they feed. Also the `FeatureStore` and `TaskSource` of Score and Generate."""

    async def ensure_schema(self) -> None: ...

    async def stored_features(
        self, user_id: str, now: float, timezone: str = ""
    ) -> dict[str, StoredValue]: ...

    async def open_tasks(self, user_id: str, now: float, limit: int) -> list[TaskView]: ...

    async def applied_among(self, event_ids: Sequence[str]) -> set[str]:
        """The ids among these whose events are already recorded."""
        ...

    async def record(self, events: Sequence[Event], now: float) -> list[bool]:
        """Record each event and its effects in one durable transaction, unless its id is
        already recorded; per event, True if it took effect now."""
        ...

    async def prune(self, now: float) -> int: ...

    async def totals(self, user_id: str | None = None) -> dict[str, float]: ...

    async def integration_status(self, user_id: str, provider: str) -> tuple[str, int] | None: ...
