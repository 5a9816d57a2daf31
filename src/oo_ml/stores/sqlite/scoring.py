"""The scoring tables on a `SqliteDB`: learned state, the decision log, off-policy sums
and generations. `SqliteStore` implements the domain's `Store` port.

Values are encoded and decoded here with `stores.codec`, on the SQLite threads, so the
event loop never decodes a blob, with one exception: a Reward's decision found among those
committed last (`recent`, ADR 0025) is decoded on the loop, 15 µs instead of the hop to
the reader. A row that does not decode raises `UnreadableRecord` (a decision) or is
skipped and counted (a state read for the priors).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import cast

from oo_ml.domain.decisions import DecisionRecord, RewardState
from oo_ml.domain.ports import (
    EVERY_POLICY,
    AddOffPolicy,
    ArmTotals,
    AttachShadows,
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
    encode_shadow_views,
    encode_state,
    serialize_decision,
)
from oo_ml.stores.sqlite import changes
from oo_ml.stores.sqlite import decision_writer as dw
from oo_ml.stores.sqlite.db import SqliteDB
from oo_ml.stores.sqlite.recent import DEFAULT_RECENT_DECISIONS_MB, RecentDecisions

log = logging.getLogger(__name__)

# Each entry migrates user_version i -> i+1. Append only.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE state (
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        revision INTEGER NOT NULL,
        data BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (user_id, policy)
    ) WITHOUT ROWID;
    CREATE TABLE decisions (
        decision_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        created_at REAL NOT NULL,
        chosen_arm TEXT NOT NULL,
        prompt_version TEXT NOT NULL DEFAULT '',
        reward REAL,
        rewarded_at REAL,
        reward_source TEXT NOT NULL DEFAULT '',
        data BLOB NOT NULL
    );
    CREATE INDEX decisions_user ON decisions (user_id, policy);
    CREATE INDEX decisions_policy ON decisions (policy, chosen_arm);
    CREATE INDEX decisions_pending ON decisions (created_at) WHERE reward IS NULL;
    CREATE TABLE off_policy (
        served TEXT NOT NULL,
        shadow TEXT NOT NULL,
        n INTEGER NOT NULL DEFAULT 0,
        weight_sum REAL NOT NULL DEFAULT 0,
        weighted_reward_sum REAL NOT NULL DEFAULT 0,
        dr_sum REAL NOT NULL DEFAULT 0,
        dr_sq_sum REAL NOT NULL DEFAULT 0,
        reward_sum REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (served, shadow)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE generations (
        generation_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        prompt_version TEXT NOT NULL,
        model TEXT NOT NULL,
        fallback INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # The prior refresh reads the most recently updated states of a policy.
    "CREATE INDEX state_policy_updated ON state (policy, updated_at);",
    # Decisions the sweeper could not read, moved out of the log with the reason.
    """
    CREATE TABLE decisions_set_aside (
        decision_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        created_at REAL NOT NULL,
        reason TEXT NOT NULL,
        set_aside_at REAL NOT NULL,
        data BLOB NOT NULL
    );
    """,
    # Score writes no learned state: the pulls per arm are counted beside the log, and the
    # shadows' views are stored beside their decision instead of rewriting it.
    """
    CREATE TABLE pulls (
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        arm TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (user_id, policy, arm)
    ) WITHOUT ROWID;
    CREATE TABLE decision_shadows (
        decision_id TEXT PRIMARY KEY,
        data BLOB NOT NULL
    ) WITHOUT ROWID;
    """,
    # Pruning by age and by size walks rewarded decisions by reward time.
    "CREATE INDEX decisions_rewarded ON decisions (rewarded_at) WHERE reward IS NOT NULL;",
    # `oo-ml migrate`: the last user done of each (from, to) state migration, to resume.
    """
    CREATE TABLE state_migrations (
        from_policy TEXT NOT NULL,
        to_policy TEXT NOT NULL,
        last_user_id TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (from_policy, to_policy)
    ) WITHOUT ROWID;
    """,
    # SNIPS's CI (ADR 0015): the squared-weight sums, and how many samples they cover
    # (rows from before this migration have sq_n < n and report no SNIPS interval).
    """
    ALTER TABLE off_policy ADD COLUMN sq_n INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE off_policy ADD COLUMN weight_sq_sum REAL NOT NULL DEFAULT 0;
    ALTER TABLE off_policy ADD COLUMN weight_sq_reward_sum REAL NOT NULL DEFAULT 0;
    ALTER TABLE off_policy ADD COLUMN weight_sq_reward_sq_sum REAL NOT NULL DEFAULT 0;
    """,
    # Issue 11: the change sequence every write of learned state bumps, which the
    # processes sharing this file follow to keep their caches fresh (ADR 0020).
    changes.SCHEMA,
    # The last revision of each model a reset deleted: a model created again starts above
    # it, so a worker still holding the pre-reset model at revision R cannot win a
    # compare-and-set against a new model that happens to have reached R.
    """
    CREATE TABLE state_resets (
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        revision INTEGER NOT NULL,
        PRIMARY KEY (user_id, policy)
    ) WITHOUT ROWID;
    """,
    # The (policy, chosen_arm) index: its ten or so keys made every group commit dirty a
    # page per arm, about a quarter of the writer's CPU a decision (52 -> 40 us), and the
    # server-wide Stats it served reads every row of the policy anyway, faster by a scan
    # (121 -> 59 ms over 120,000 decisions). ADR 0028.
    "DROP INDEX IF EXISTS decisions_policy;",
    # Pulls are counted from the log (ADR 0030): the per-user index gains the chosen arm,
    # so a user's pulls are a count over it, and a decision no longer updates a second
    # per-user B-tree (`pulls`) in the writer: a page per decision, 30 % of the writer's
    # CPU. `pull_offsets` holds what the log does not: + the pulls of decisions pruned or
    # set aside, - those of the rewarded decisions a reset kept. Built here from both.
    # `pulls` stays, unread: a writer process of the previous version (a worker not yet
    # restarted after an upgrade in place) still inserts into it, harmlessly.
    """
    CREATE INDEX decisions_user_arm ON decisions (user_id, policy, chosen_arm);
    DROP INDEX decisions_user;
    CREATE TABLE pull_offsets (
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        arm TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (user_id, policy, arm)
    ) WITHOUT ROWID;
    INSERT INTO pull_offsets (user_id, policy, arm, n)
        SELECT user_id, policy, arm, sum(n) FROM (
            SELECT user_id, policy, arm, n FROM pulls
            UNION ALL
            SELECT user_id, policy, chosen_arm, -count(*) FROM decisions
                GROUP BY user_id, policy, chosen_arm
        ) GROUP BY user_id, policy, arm HAVING sum(n) != 0;
    """,
]


def _offset_pulls(
    conn: sqlite3.Connection, where: str, args: Sequence[object], sign: int = 1
) -> None:
    """Add the pulls of the decisions `where` selects to `pull_offsets` (before they
    leave the log: pruned, set aside), or subtract them (`sign` -1: a reset zeroes pulls
    but keeps rewarded decisions)."""
    conn.execute(
        "INSERT INTO pull_offsets (user_id, policy, arm, n)"
        f" SELECT user_id, policy, chosen_arm, {sign:d} * count(*) FROM decisions"
        f" WHERE {where} GROUP BY user_id, policy, chosen_arm"
        " ON CONFLICT (user_id, policy, arm) DO UPDATE SET n = n + excluded.n",
        tuple(args),
    )


def _decision_row(r: DecisionRecord) -> dw.DecisionRow:
    chosen = r.chosen
    return (
        r.decision_id,
        r.user_id,
        r.policy,
        r.created_at,
        chosen.arm,
        chosen.prompt_version,
        # Compressed by the writer, off the loop: zlib was the largest single piece of
        # the encoding (6 of 16 us per decision, measured idle).
        serialize_decision(r),
    )


def _steps(writes: Sequence[Write]) -> list[Write | dw.Step]:
    """`writes` with each run of decisions, and of shadow views, made one step of rows
    (`decision_writer`), in order."""
    out: list[Write | dw.Step] = []
    decisions: list[dw.DecisionRow] | None = None
    shadows: list[dw.ShadowRow] | None = None
    for w in writes:
        if isinstance(w, InsertDecision):
            shadows = None
            if decisions is None:
                decisions = []
                out.append(("decisions", decisions))
            decisions.append(_decision_row(w.record))
        elif isinstance(w, AttachShadows):
            decisions = None
            if shadows is None:
                shadows = []
                out.append(("shadows", shadows))
            shadows.append((w.decision_id, encode_shadow_views(w.views, w.vectors)))
        else:
            decisions = shadows = None
            out.append(w)
    return out


def _write(w: Write, origin: int) -> dw.Write:
    """A reward's write as the writer (thread or child process) runs it (`dw.write`); the
    state is encoded here, on the caller's side."""
    match w:
        case PutState(user_id, policy, revision, state):
            return (
                "put_state",
                user_id,
                policy,
                revision,
                encode_state(state),
                time.time(),
                origin,
            )
        case MarkRewarded(decision_id, reward, at, source):
            return ("mark_rewarded", decision_id, reward, at, source)
        case AddOffPolicy(served, shadow, weight, reward, dr):
            return ("off_policy", served, shadow, weight, reward, dr)
    raise TypeError(f"not a write this store commits: {type(w).__name__}")


def _apply(conn: sqlite3.Connection, w: dw.Write, revisions: dict[tuple[str, str], int]) -> None:
    """One reward write on the writer thread (`commit` makes steps of decisions)."""
    try:
        dw.write(conn, w, revisions)
    except dw.Conflicted as e:
        raise Conflict(str(e)) from None


# How often the decision log's bytes per row are measured again from the pages.
_RESIZE_S = 300.0
# Per row, before anything was measured: a format-2 record with ten candidates, its
# columns and its index entries (measured about 380 bytes on disk with one index more).
_BYTES_PER_ROW_GUESS = 400.0
_DECISION_TABLES = (
    "decisions",
    "sqlite_autoindex_decisions_1",
    "decisions_user_arm",
    "decisions_pending",
    "decision_shadows",
    "sqlite_autoindex_decision_shadows_1",
)


def _measured_bytes_per_row(conn: sqlite3.Connection, rows: int) -> float:
    if rows == 0:
        return _BYTES_PER_ROW_GUESS
    try:
        marks = ",".join("?" * len(_DECISION_TABLES))
        used = conn.execute(
            f"SELECT sum(pgsize - unused) FROM dbstat WHERE name IN ({marks})",
            _DECISION_TABLES,
        ).fetchone()[0]
    except sqlite3.OperationalError:  # SQLite built without dbstat
        return _BYTES_PER_ROW_GUESS
    return float(used or 0) / rows if used else _BYTES_PER_ROW_GUESS


class SqliteStore:
    """The engine's `Store` on a `SqliteDB`."""

    def __init__(
        self,
        db: SqliteDB,
        writer: dw.WriterProcess | None = None,
        recent_decisions_mb: float = DEFAULT_RECENT_DECISIONS_MB,
    ) -> None:
        self.db = db
        self.writer = writer
        """The child process that commits the decision log's batches (`OO_DECISION_WRITER
        =process`); None: the writer thread commits everything."""
        self.recent = RecentDecisions(int(recent_decisions_mb * 1024 * 1024))
        """The decisions committed last, for the Reward join (`OO_DECISION_CACHE_MB`)."""
        self.unreadable_states = 0
        """States skipped by `policy_states` because they do not decode."""
        self._bytes_per_row: float | None = None
        self._sized_at = 0.0

    @property
    def away_until(self) -> float:
        return -float("inf")  # a file on this machine is never away

    @classmethod
    def open(
        cls,
        path: Path | str,
        decision_writer: str = "thread",
        recent_decisions_mb: float = DEFAULT_RECENT_DECISIONS_MB,
    ) -> SqliteStore:
        """The store on the file at `path` (created and migrated if need be).
        `decision_writer`: "process" commits the decision log's batches in a child
        process (what `oo-ml serve` runs by default), "thread" on the writer thread.
        `recent_decisions_mb`: memory for the decisions committed last (`recent`)."""
        db = SqliteDB(path, MIGRATIONS)
        if decision_writer == "process" and str(path) != ":memory:":
            return cls(db, dw.WriterProcess(str(path)), recent_decisions_mb)
        return cls(db, None, recent_decisions_mb)

    async def get(self, user_id: str, policy: str) -> StoredState | None:
        def q(conn: sqlite3.Connection) -> StoredState | None:
            row = conn.execute(
                "SELECT revision, data FROM state WHERE user_id = ? AND policy = ?",
                (user_id, policy),
            ).fetchone()
            return StoredState(row[0], decode_state(row[1])) if row else None

        return await self.db.read(q)

    async def compare_and_set(
        self, user_id: str, policy: str, revision: int, state: PolicyState
    ) -> int | None:
        try:
            revs = await self.commit([PutState(user_id, policy, revision, state)])
        except Conflict:
            return None
        return revs[(user_id, policy)]

    async def commit(self, writes: Sequence[Write]) -> dict[tuple[str, str], int]:
        # Decisions are serialized, shadow views and states encoded here, on the caller's
        # thread (the event loop): what crosses to the writer is rows and bytes.
        steps = _steps(writes)
        rows = [s for s in steps if isinstance(s, tuple)]
        others = [_write(w, self.db.origin) for w in steps if not isinstance(w, tuple)]
        for w in writes:
            if isinstance(w, MarkRewarded):  # the row changes: its kept copy is void
                self.recent.discard(w.decision_id)
        if self.writer is not None and steps and not (rows and others):
            # To the child process (decision_writer): the decision log's group commits,
            # and rewards' transactions, which share frames with each other (ADR 0027).
            try:
                if rows:
                    await self.writer.commit(rows)
                    self._keep(rows)
                    return {}
                return await self.writer.transact(others)
            except dw.Conflicted as e:
                raise Conflict(str(e)) from None
            except OSError as e:
                raise TransientStoreError(str(e)) from e

        def tx(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            revisions: dict[tuple[str, str], int] = {}
            pending = iter(others)
            for step in steps:
                if isinstance(step, tuple):
                    dw.apply(conn, [step])
                else:
                    _apply(conn, next(pending), revisions)
            return revisions

        revisions = await self.db.run(tx)
        self._keep(rows)
        return revisions

    def _keep(self, steps: Sequence[dw.Step]) -> None:
        """Committed decision rows and shadow views, kept for the Reward join."""
        for kind, rows in steps:
            if kind == "decisions":
                self.recent.keep(cast(Sequence[dw.DecisionRow], rows))
            else:
                self.recent.attach(cast(Sequence[dw.ShadowRow], rows))

    async def get_decision(self, decision_id: str) -> StoredDecision | None:
        kept = self.recent.take(decision_id)
        if kept is not None:
            return kept

        def q(conn: sqlite3.Connection) -> StoredDecision | None:
            row = conn.execute(
                "SELECT d.data, d.reward, d.rewarded_at, d.reward_source, s.data, d.user_id,"
                " d.policy, d.created_at FROM decisions d"
                " LEFT JOIN decision_shadows s ON s.decision_id = d.decision_id"
                " WHERE d.decision_id = ?",
                (decision_id,),
            ).fetchone()
            if row is None:
                return None
            record = decode_decision(row[0], DecisionKey(decision_id, row[5], row[6], row[7]))
            if row[4] is not None:
                views, vectors = decode_shadow_views(row[4])
                record = replace(record, shadows=views, shadow_vectors=vectors)
            return StoredDecision(record, RewardState(row[1], row[2], row[3]))

        return await self.db.read(q)

    async def pulls(self, user_id: str, policy: str) -> dict[str, int]:
        def q(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT arm, sum(n) FROM ("
                " SELECT arm, n FROM pull_offsets WHERE user_id = ? AND policy = ?"
                " UNION ALL SELECT chosen_arm, count(*) FROM decisions"
                " WHERE user_id = ? AND policy = ? GROUP BY chosen_arm"
                ") GROUP BY arm HAVING sum(n) > 0",
                (user_id, policy, user_id, policy),
            )
            return {arm: int(n) for arm, n in rows}

        return await self.db.read(q)

    async def pending_before(self, cutoff: float, limit: int) -> list[str]:
        def q(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT decision_id FROM decisions WHERE reward IS NULL AND created_at < ?"
                " ORDER BY created_at LIMIT ?",
                (cutoff, limit),
            ).fetchall()
            return [r[0] for r in rows]

        return await self.db.read(q)

    async def reset_user(self, user_id: str) -> tuple[int, int]:
        origin = self.db.origin
        self.recent.forget_user(user_id)

        def tx(conn: sqlite3.Connection) -> tuple[int, int]:
            conn.execute(
                "INSERT OR REPLACE INTO state_resets (user_id, policy, revision)"
                " SELECT user_id, policy, revision FROM state WHERE user_id = ?",
                (user_id,),
            )
            states = conn.execute("DELETE FROM state WHERE user_id = ?", (user_id,)).rowcount
            conn.execute(
                "DELETE FROM decision_shadows WHERE decision_id IN (SELECT decision_id"
                " FROM decisions WHERE user_id = ? AND reward IS NULL)",
                (user_id,),
            )
            pending = conn.execute(
                "DELETE FROM decisions WHERE user_id = ? AND reward IS NULL", (user_id,)
            ).rowcount
            # Pulls start from zero: the rewarded decisions the log keeps are offset.
            conn.execute("DELETE FROM pull_offsets WHERE user_id = ?", (user_id,))
            _offset_pulls(conn, "user_id = ?", (user_id,), sign=-1)
            changes.note(conn, origin, user_id, EVERY_POLICY, 0)
            return states, pending

        return await self.db.run(tx)

    async def policy_states(self, policy: str, limit: int) -> list[PolicyState]:
        def q(conn: sqlite3.Connection) -> list[PolicyState]:
            rows = conn.execute(
                "SELECT user_id, data FROM state WHERE policy = ? ORDER BY updated_at DESC LIMIT ?",
                (policy, limit),
            ).fetchall()
            states = []
            for user_id, data in rows:
                try:
                    states.append(decode_state(data))
                except UnreadableRecord as e:
                    # One unreadable model must not deny every new user the prior.
                    self.unreadable_states += 1
                    log.warning("state of %r under %r skipped: %s", user_id, policy, e)
            return states

        return await self.db.read(q)

    async def states_after(
        self, policy: str, after_user: str, limit: int
    ) -> list[tuple[str, StoredState | None]]:
        """One page of a policy's states in user_id order, strictly after `after_user`
        ("" for the first page): (user, state and revision), None for a state that does not
        decode."""

        def q(conn: sqlite3.Connection) -> list[tuple[str, StoredState | None]]:
            rows = conn.execute(
                "SELECT user_id, revision, data FROM state WHERE policy = ? AND user_id > ?"
                " ORDER BY user_id LIMIT ?",
                (policy, after_user, limit),
            ).fetchall()
            page: list[tuple[str, StoredState | None]] = []
            for user_id, revision, data in rows:
                try:
                    page.append((user_id, StoredState(revision, decode_state(data))))
                except UnreadableRecord as e:
                    log.warning("state of %r under %r unreadable: %s", user_id, policy, e)
                    page.append((user_id, None))
            return page

        return await self.db.read(q)

    async def migration_cursor(self, from_policy: str, to_policy: str) -> str:
        """The last user a (from, to) migration finished ("" when it has not started)."""

        def q(conn: sqlite3.Connection) -> str:
            row = conn.execute(
                "SELECT last_user_id FROM state_migrations WHERE from_policy = ? AND to_policy = ?",
                (from_policy, to_policy),
            ).fetchone()
            return str(row[0]) if row else ""

        return await self.db.read(q)

    async def set_migration_cursor(self, from_policy: str, to_policy: str, user_id: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO state_migrations (from_policy, to_policy, last_user_id, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (from_policy, to_policy) DO UPDATE SET"
                " last_user_id = excluded.last_user_id, updated_at = excluded.updated_at",
                (from_policy, to_policy, user_id, time.time()),
            )

        await self.db.run(tx)

    async def set_aside(self, decision_id: str, reason: str) -> None:
        self.recent.discard(decision_id)  # it leaves the log

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO decisions_set_aside (decision_id, user_id, policy,"
                " created_at, reason, set_aside_at, data) SELECT decision_id, user_id, policy,"
                " created_at, ?, ?, data FROM decisions WHERE decision_id = ?",
                (reason[:500], time.time(), decision_id),
            )
            _offset_pulls(conn, "decision_id = ?", (decision_id,))
            conn.execute("DELETE FROM decisions WHERE decision_id = ?", (decision_id,))
            conn.execute("DELETE FROM decision_shadows WHERE decision_id = ?", (decision_id,))

        await self.db.run(tx)

    async def policy_totals(self, policy: str) -> PolicyTotals:
        def q(conn: sqlite3.Connection) -> PolicyTotals:
            arms = [
                ArmTotals(r[0], r[1], r[2], r[3] or 0.0)
                for r in conn.execute(
                    "SELECT chosen_arm, count(*), count(reward), total(reward) FROM decisions"
                    " WHERE policy = ? GROUP BY chosen_arm ORDER BY chosen_arm",
                    (policy,),
                )
            ]
            users, pending = conn.execute(
                "SELECT count(DISTINCT user_id), count(*) - count(reward) FROM decisions WHERE policy = ?",
                (policy,),
            ).fetchone()
            return PolicyTotals(arms=arms, users=users or 0, pending=pending or 0)

        return await self.db.read(q)

    async def prompt_totals(self, policy: str, user_id: str | None) -> list[PromptTotals]:
        def q(conn: sqlite3.Connection) -> list[PromptTotals]:
            sql = (
                "SELECT prompt_version, count(*), count(reward), total(reward) FROM decisions"
                " WHERE policy = ? AND prompt_version != ''"
            )
            args: tuple[str, ...] = (policy,)
            if user_id is not None:
                sql += " AND user_id = ?"
                args = (policy, user_id)
            sql += " GROUP BY prompt_version ORDER BY prompt_version"
            return [PromptTotals(r[0], r[1], r[2], r[3]) for r in conn.execute(sql, args)]

        return await self.db.read(q)

    async def off_policy_totals(self, served: str) -> list[OffPolicyTotals]:
        def q(conn: sqlite3.Connection) -> list[OffPolicyTotals]:
            return [
                OffPolicyTotals(*r)
                for r in conn.execute(
                    "SELECT shadow, n, weight_sum, weighted_reward_sum, dr_sum, dr_sq_sum,"
                    " reward_sum, sq_n, weight_sq_sum, weight_sq_reward_sum,"
                    " weight_sq_reward_sq_sum FROM off_policy WHERE served = ? ORDER BY shadow",
                    (served,),
                )
            ]

        return await self.db.read(q)

    async def pending_count(self, user_id: str, policy: str) -> int:
        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM decisions WHERE user_id = ? AND policy = ? AND reward IS NULL",
                (user_id, policy),
            ).fetchone()
            return int(row[0])

        return await self.db.read(q)

    async def prune_decisions(self, rewarded_before: float) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM decision_shadows WHERE decision_id IN (SELECT decision_id"
                " FROM decisions WHERE reward IS NOT NULL AND rewarded_at < ?)",
                (rewarded_before,),
            )
            _offset_pulls(conn, "reward IS NOT NULL AND rewarded_at < ?", (rewarded_before,))
            n = conn.execute(
                "DELETE FROM decisions WHERE reward IS NOT NULL AND rewarded_at < ?",
                (rewarded_before,),
            ).rowcount
            conn.execute("DELETE FROM generations WHERE created_at < ?", (rewarded_before,))
            return n

        return await self.db.run(tx)

    async def decision_log_size(self) -> tuple[int, int]:
        """Rows, and bytes on disk: the decision tables' and their indexes' pages, from the
        dbstat table where SQLite has it (read at most every few minutes: it walks the
        pages), else a per-row estimate."""

        def q(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = int(conn.execute("SELECT count(*) FROM decisions").fetchone()[0])
            now = time.monotonic()
            if self._bytes_per_row is None or now - self._sized_at > _RESIZE_S:
                self._sized_at = now
                self._bytes_per_row = _measured_bytes_per_row(conn, rows)
            return rows, int(rows * self._bytes_per_row)

        return await self.db.read(q)

    async def prune_oldest_rewarded(self, count: int) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            # Ties broken by id: the three statements below must pick the same rows.
            oldest = (
                "SELECT decision_id FROM decisions WHERE reward IS NOT NULL"
                " ORDER BY rewarded_at, decision_id LIMIT ?"
            )
            conn.execute(f"DELETE FROM decision_shadows WHERE decision_id IN ({oldest})", (count,))
            _offset_pulls(conn, f"decision_id IN ({oldest})", (count,))
            return int(
                conn.execute(
                    f"DELETE FROM decisions WHERE decision_id IN ({oldest})", (count,)
                ).rowcount
            )

        return await self.db.run(tx)

    async def checkpoint(self) -> None:
        await self.db.checkpoint()

    async def record_generation(self, g: GenerationRecord) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO generations (generation_id, user_id, prompt_version, model,"
                " fallback, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    g.generation_id,
                    g.user_id,
                    g.prompt_version,
                    g.model,
                    int(g.fallback),
                    g.created_at,
                ),
            )

        await self.db.run(tx)

    async def generations(self, ids: Sequence[str]) -> dict[str, GenerationRecord]:
        def q(conn: sqlite3.Connection) -> dict[str, GenerationRecord]:
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                "SELECT generation_id, user_id, prompt_version, model, fallback, created_at"
                f" FROM generations WHERE generation_id IN ({marks})",
                tuple(ids),
            )
            return {r[0]: GenerationRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows}

        return await self.db.read(q) if ids else {}

    async def close(self) -> None:
        try:
            if self.writer is not None:
                await self.writer.close()
        finally:
            await self.db.close()
