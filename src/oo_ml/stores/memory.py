"""A `StateStore` in a dict, for tests and the simulator."""

from __future__ import annotations

import asyncio

from oo_ml.domain.ports import StoredState
from oo_ml.domain.state import PolicyState


class MemoryStateStore:
    def __init__(self) -> None:
        self._data: dict[tuple[str, str], StoredState] = {}
        self._lock = asyncio.Lock()

    async def get(self, user_id: str, policy: str) -> StoredState | None:
        return self._data.get((user_id, policy))

    async def compare_and_set(
        self, user_id: str, policy: str, revision: int, state: PolicyState
    ) -> int | None:
        async with self._lock:
            current = self._data.get((user_id, policy))
            if (current.revision if current else 0) != revision:
                return None
            self._data[(user_id, policy)] = StoredState(revision + 1, state)
            return revision + 1

    def keys(self) -> list[tuple[str, str]]:
        return list(self._data)
