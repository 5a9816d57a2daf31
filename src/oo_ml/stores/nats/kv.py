"""JetStream KV plumbing shared by the NATS stores: buckets, keys and compare-and-set.

A KV key may only hold `[-/_=.a-zA-Z0-9]`, and `.` separates tokens; user ids and policy
names are free text, so `token()` keeps a plain id as it is (prefixed `p`) and encodes any
other in unpadded base32 (prefixed `b`): distinct ids never share a key.

`update()` is the one way a read-modify-write happens: read the entry, compute the new
value, write it with `update(key, value, last=revision)` (or `create` when there was
none), and on a wrong-last-sequence error (another replica wrote first) wait a jittered,
growing pause and start again from a fresh read. Nothing is lost to a concurrent writer:
the loser recomputes from the winner's value.

`get_many()` reads the last message of many subjects (keys, or a plain stream's subjects)
in one batched direct-get request, where `get` makes one a key; `update(first=...)` then
starts from what it read.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig, StreamInfo
from nats.js.kv import KeyValue

from oo_ml.errors import Conflict

T = TypeVar("T")
log = logging.getLogger(__name__)

_PLAIN = re.compile(r"[A-Za-z0-9_-]{1,100}")
_KV_OP = "KV-Operation"

# Retries of a compare-and-set against other writers before giving up with Conflict; the
# pause doubles from 2 ms, jittered, so 500 concurrent writers of one key spread out.
CAS_ATTEMPTS = 64
_FIRST_PAUSE_S = 0.002
_MAX_PAUSE_S = 0.25


def token(text: str) -> str:
    """A KV key token for free text: `p<text>` when it is plain, else `b<base32>`."""
    if _PLAIN.fullmatch(text):
        return "p" + text
    return "b" + base64.b32encode(text.encode()).decode().rstrip("=")


def untoken(tok: str) -> str:
    """The text of a `token()`."""
    if tok.startswith("p"):
        return tok[1:]
    if tok.startswith("b"):
        body = tok[1:]
        return base64.b32decode(body + "=" * (-len(body) % 8)).decode()
    raise ValueError(f"not a key token: {tok!r}")


# How long start-up keeps asking JetStream to create or find a bucket or stream.
SETUP_WITHIN_S = 60.0
# What a JetStream API call answers while the cluster cannot yet: no meta leader elected,
# JetStream not enabled yet on the node we reached, or a reply slower than the timeout
# (creating a replicated asset on a loaded cluster can take seconds).
_NOT_READY = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)
# "no suitable peers for placement" (a 400): a meta leader exists but knows too few peers to
# be up to place every replica. It answers so while nodes are down or still (re)joining the
# meta group, and stops once they are back, so it is waited out like the errors above.
NO_PEERS = 10005


def not_ready(e: BaseException) -> bool:
    """Whether a JetStream API call failed only because the cluster cannot answer yet."""
    if isinstance(e, _NOT_READY):
        return True
    return isinstance(e, nats.js.errors.APIError) and e.err_code == NO_PEERS


async def settled(step: Callable[[], Awaitable[T]], what: str, within_s: float | None = None) -> T:
    """`step()`, repeated while JetStream is not ready, for up to `within_s` (default
    `SETUP_WITHIN_S`).

    Only for idempotent set-up (find-or-create): a timed-out create may have happened,
    and the next attempt finds it. Pauses double from 0.25 s to 4 s."""
    deadline = time.monotonic() + (SETUP_WITHIN_S if within_s is None else within_s)
    pause = 0.25
    while True:
        try:
            return await step()
        except Exception as e:
            if not not_ready(e) or time.monotonic() + pause > deadline:
                raise
            log.warning(
                "%s: JetStream not ready (%s: %s); retrying in %.2f s",
                what,
                type(e).__name__,
                e,
                pause,
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 4.0)


async def ensure_bucket(
    js: JetStreamContext,
    name: str,
    *,
    replicas: int,
    ttl_s: float | None = None,
    history: int = 1,
) -> KeyValue:
    """The bucket, created if it does not exist (on file storage, `replicas` copies);
    retried while JetStream is not ready (`settled`)."""
    return await settled(
        lambda: _ensure_bucket(js, name, replicas=replicas, ttl_s=ttl_s, history=history),
        f"bucket {name}",
    )


async def _ensure_bucket(
    js: JetStreamContext, name: str, *, replicas: int, ttl_s: float | None, history: int
) -> KeyValue:
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = KeyValueConfig(
        bucket=name,
        history=history,
        ttl=ttl_s,
        replicas=replicas,
        storage=StorageType.FILE,
        direct=True,
    )
    try:
        return await js.create_key_value(config=config)
    except nats.js.errors.BadRequestError as e:
        # Another replica may have created it between our two calls; if not, the refusal
        # itself is the answer (`settled` waits out a placement failure).
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            raise e from None


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """The stream's info, created from `config` if it does not exist (an existing stream is
    left as it is); retried while JetStream is not ready (`settled`)."""
    assert config.name is not None
    return await settled(lambda: _find_or_add_stream(js, config), f"stream {config.name}")


async def _find_or_add_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    assert config.name is not None
    try:
        return await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        pass
    try:
        return await js.add_stream(config)
    except nats.js.errors.BadRequestError as e:
        try:
            return await js.stream_info(config.name)  # another replica made it meanwhile
        except nats.js.errors.NotFoundError:
            raise e from None


async def get(kv: KeyValue, key: str) -> tuple[int, bytes] | None:
    """The key's revision and value; None when it does not exist (or was deleted)."""
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    if entry.value is None:
        return None
    return entry.revision or 0, entry.value


async def put_if(kv: KeyValue, key: str, value: bytes, last: int) -> int | None:
    """Write `value` if the key's revision is `last` (0: the key must not exist); the new
    revision, or None when another writer got there first."""
    try:
        if last == 0:
            return await kv.create(key, value)
        return await kv.update(key, value, last=last)
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def update(
    kv: KeyValue,
    key: str,
    change: Callable[[bytes | None], Awaitable[tuple[bytes | None, T]]],
    *,
    attempts: int = CAS_ATTEMPTS,
    first: tuple[int, bytes | None] | None = None,
) -> tuple[int, T]:
    """Read-modify-write `key` with compare-and-set, retried with jitter on a conflict.

    `change(current)` returns the new value (None: write nothing) and a result; it may be
    called several times and must not have effects of its own. Returns the revision
    written (or read, when nothing was written) and the result of the call that won.
    `first` is the key's (revision, value) read beforehand (`get_many` reads many keys in
    one request): the first attempt starts from it instead of reading again.
    """
    pause = _FIRST_PAUSE_S
    for _ in range(attempts):
        current = first if first is not None else await get(kv, key)
        first = None
        revision, value = current if current is not None else (0, None)
        new, result = await change(value)
        if new is None:
            return revision, result
        written = await put_if(kv, key, new, revision)
        if written is not None:
            return written, result
        await asyncio.sleep(random.uniform(0, pause))
        pause = min(pause * 2, _MAX_PAUSE_S)
    raise Conflict(f"{key!r} kept changing under {attempts} attempts; try again")


# A batched direct get answers at most this many subjects (nats-server: 413 beyond).
_MULTI_LAST_MAX = 1024


async def get_many(
    nc: Client,
    stream: str,
    subjects: Collection[str],
    *,
    timeout_s: float = 5.0,
    api_prefix: str = "$JS.API",
) -> dict[str, tuple[int, bytes | None]]:
    """The last message of each subject that has one, as subject -> (sequence, data), data
    None for a KV delete or purge marker (its sequence is still the revision to
    compare-and-set against). One request per 1024 subjects, a batched direct get
    (`multi_last`, nats-server 2.11+; the stream needs allow_direct), where `get` would
    make one request a key: for a batch of 256 keys about 6 ms instead of 14 here."""
    unique = list(dict.fromkeys(subjects))
    chunks = [unique[i : i + _MULTI_LAST_MAX] for i in range(0, len(unique), _MULTI_LAST_MAX)]
    found: dict[str, tuple[int, bytes | None]] = {}
    for chunk in chunks:
        found.update(await _multi_last(nc, stream, chunk, timeout_s, api_prefix))
    return found


async def _multi_last(
    nc: Client, stream: str, subjects: list[str], timeout_s: float, api_prefix: str
) -> dict[str, tuple[int, bytes | None]]:
    replies: asyncio.Queue[Msg] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        replies.put_nowait(msg)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        request = {"multi_last": subjects, "batch": len(subjects)}
        await nc.publish(
            f"{api_prefix}.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
        )
        found: dict[str, tuple[int, bytes | None]] = {}
        while True:
            try:
                msg = await asyncio.wait_for(replies.get(), timeout_s)
            except TimeoutError:
                raise nats.errors.TimeoutError from None
            headers = msg.headers or {}
            status = headers.get("Status")
            if status == "404":  # none of the subjects has a message
                return found
            if status is not None:
                if status != "204" or headers.get("Nats-Num-Pending", "0") != "0":
                    raise nats.js.errors.APIError(
                        code=int(status), description=headers.get("Description", "")
                    )
                return found  # 204: end of the batch
            deleted = headers.get(_KV_OP) in ("DEL", "PURGE")
            found[headers["Nats-Subject"]] = (
                int(headers["Nats-Sequence"]),
                None if deleted else msg.data,
            )
    finally:
        await sub.unsubscribe()
