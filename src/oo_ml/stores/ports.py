"""Storage ports: what the engine needs from a store, as Protocols, and the write vocabulary.

Stores persist bytes made by `state_codec`; they never see a proto or a numpy array.

- `StateStore`: per (user, policy) state with `get` and compare-and-set on a revision.
  Implementations: `sqlite_store.SqliteStore` (embedded default) and `MemoryStateStore`
  (tests and the simulator).
- `Store`: a `StateStore` that also keeps the decision log and commits a list of writes
  atomically, so that a reward and the state it changes land together or not at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from oo_ml.domain.decisions import RewardState
from oo_ml.errors import OoError


@dataclass(frozen=True, slots=True)
class StoredState:
    revision: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PutState:
    """Write state if its current revision is `revision` (0: it must not exist yet)."""

    user_id: str
    policy: str
    revision: int
    data: bytes


@dataclass(frozen=True, slots=True)
class InsertDecision:
    decision_id: str
    user_id: str
    policy: str
    created_at: float
    chosen_arm: str
    prompt_version: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ReplaceDecisionData:
    """Attach late results (the shadows' views) to a logged decision."""

    decision_id: str
    data: bytes


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


Write = PutState | InsertDecision | ReplaceDecisionData | MarkRewarded | AddOffPolicy


class Conflict(OoError):
    """A conditional write found the store changed; nothing in the commit was applied."""


@dataclass(frozen=True, slots=True)
class StoredDecision:
    data: bytes
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


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    """A tip Generate wrote, so a candidate naming it is attributed to its prompt version."""

    generation_id: str
    user_id: str
    prompt_version: str
    model: str
    fallback: bool
    created_at: float


class StateStore(Protocol):
    async def get(self, user_id: str, policy: str) -> StoredState | None: ...

    async def compare_and_set(
        self, user_id: str, policy: str, revision: int, data: bytes
    ) -> int | None:
        """Store data if the current revision is `revision`; the new revision, or None."""
        ...


class Store(StateStore, Protocol):
    async def commit(self, writes: Sequence[Write]) -> dict[tuple[str, str], int]:
        """Apply every write atomically and durably; raise Conflict if any condition fails.
        Returns the new revision of each state written."""
        ...

    async def get_decision(self, decision_id: str) -> StoredDecision | None: ...

    async def pending_before(self, cutoff: float, limit: int) -> list[str]: ...

    async def reset_user(self, user_id: str) -> tuple[int, int]:
        """Delete the user's state under every policy and their pending decisions."""
        ...

    async def policy_states(self, policy: str, limit: int) -> list[bytes]: ...

    async def policy_totals(self, policy: str) -> PolicyTotals: ...

    async def prompt_totals(self, policy: str, user_id: str | None) -> list[PromptTotals]: ...

    async def off_policy_totals(self, served: str) -> list[OffPolicyTotals]: ...

    async def pending_count(self, user_id: str, policy: str) -> int: ...

    async def prune_decisions(self, rewarded_before: float) -> int:
        """Forget decisions rewarded before the given time; pending ones are kept."""
        ...

    async def record_generation(self, g: GenerationRecord) -> None: ...

    async def generations(self, ids: Sequence[str]) -> dict[str, GenerationRecord]: ...

    async def close(self) -> None: ...


class MemoryStateStore:
    """A StateStore in a dict, for tests and the simulator."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], StoredState] = {}
        self._lock = asyncio.Lock()

    async def get(self, user_id: str, policy: str) -> StoredState | None:
        return self._data.get((user_id, policy))

    async def compare_and_set(
        self, user_id: str, policy: str, revision: int, data: bytes
    ) -> int | None:
        async with self._lock:
            current = self._data.get((user_id, policy))
            if (current.revision if current else 0) != revision:
                return None
            self._data[(user_id, policy)] = StoredState(revision + 1, data)
            return revision + 1

    def keys(self) -> list[tuple[str, str]]:
        return list(self._data)
