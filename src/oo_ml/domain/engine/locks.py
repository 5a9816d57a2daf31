"""Per-key asyncio locks that exist only while someone holds or waits for them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedLocks:
    """Serialises work per key (a user) without a global lock, and without keeping a lock
    for every user ever seen: an entry lives while it is held or awaited."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        """Keys with work in flight or waiting (a gauge for operators)."""
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[bool]:
        """Hold the key's lock; yields whether it had to wait for it (False: nobody held
        or awaited it, so nothing of this process ran between the call and the hold)."""
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            waited = users[0] > 1
            async with lock:
                yield waited
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]
