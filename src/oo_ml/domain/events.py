"""Events as the domain sees them: what ingest decodes an envelope into. No proto here.

`ingest.decode` turns `oo.events.v1.Envelope` bytes into these values; the profile store
records their effects and the engine takes the rewards of `TipFeedback`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    COMPLETED = "completed"
    DISMISSED = "dismissed"
    SNOOZED = "snoozed"


@dataclass(frozen=True, slots=True)
class TipServed:
    decision_id: str
    tip_id: str


@dataclass(frozen=True, slots=True)
class TipViewed:
    decision_id: str
    tip_id: str
    dwell_ms: int


@dataclass(frozen=True, slots=True)
class TipFeedback:
    decision_id: str
    tip_id: str
    action: Action
    dwell_ms: int


@dataclass(frozen=True, slots=True)
class Task:
    task_id: str
    title: str  # user data: stored for prompts, never logged
    due_at: float | None
    priority: int
    completed: bool


@dataclass(frozen=True, slots=True)
class TaskSynced:
    provider: str
    tasks: tuple[Task, ...]


class IntegrationChange(enum.Enum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    SYNC_FAILED = "sync_failed"


@dataclass(frozen=True, slots=True)
class Integration:
    provider: str
    change: IntegrationChange
    detail: str  # account id, reason or error
    attempt: int = 0
    retryable: bool = False


Payload = TipServed | TipViewed | TipFeedback | TaskSynced | Integration


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: str
    occurred_at: float  # unix seconds, from the envelope
    kind: str  # the envelope's payload field name
    payload: Payload


@dataclass(frozen=True, slots=True)
class UnknownKind:
    event_id: str
    kind: str  # the payload field name, or "" when none this build knows is set
