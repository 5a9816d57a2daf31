"""Migration on demand: move every user's model from one policy to another in one pass.

`migrate_states` pages through the source policy's states in user_id order (a cursor the
store keeps, so an interrupted run resumes after the last page it finished) and writes
each state, padded to the target policy's feature version (`PolicyState.migrated`: A ->
blockdiag(A, lambda I), b -> [b, 0], so the new dimensions start with coefficient 0), with
compare-and-set at revision 0 (counters and priors carried over): a user who already has a state under the target policy
(served by it, or migrated by an earlier run) is skipped, never overwritten. Re-running
is therefore idempotent. The lazy migration on first read (`engine.models`) still covers
a policy whose own feature version grew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from oo_ml.domain.features import FEATURE_VERSIONS
from oo_ml.domain.ports import MigrationStore

DEFAULT_PAGE = 500


@dataclass(frozen=True, slots=True)
class MigrationReport:
    from_policy: str
    to_policy: str
    feature_version: str
    resumed_after: str
    """The cursor the run started from ("" for a fresh run)."""
    migrated: int = 0
    skipped: int = 0
    """Users who already had a state under the target policy."""
    unreadable: int = 0
    last_user: str = ""
    complete: bool = False
    """The pass reached the last user (the cursor is then reset: a re-run is a full,
    idempotent pass that skips everyone already migrated)."""


async def migrate_states(
    store: MigrationStore,
    from_policy: str,
    to_policy: str,
    to_feature_version: str,
    *,
    page: int = DEFAULT_PAGE,
    stop_after_pages: int | None = None,
    on_page: Callable[[MigrationReport], None] | None = None,
) -> MigrationReport:
    """Copy every user's `from_policy` state to `to_policy`, padded to the target feature
    version; resumable (`stop_after_pages` simulates an interruption, for tests)."""
    if from_policy == to_policy:
        raise ValueError("--from and --to are the same policy")
    if page < 1:
        raise ValueError(f"page must be >= 1 (got {page})")
    fv = FEATURE_VERSIONS[to_feature_version]
    cursor = await store.migration_cursor(from_policy, to_policy)
    report = MigrationReport(from_policy, to_policy, fv.name, cursor, last_user=cursor)
    pages = 0
    while stop_after_pages is None or pages < stop_after_pages:
        rows = await store.states_after(from_policy, cursor, page)
        if not rows:
            await store.set_migration_cursor(from_policy, to_policy, "")
            report = replace(report, complete=True)
            break
        migrated = skipped = unreadable = 0
        for user_id, stored in rows:
            if stored is None:
                unreadable += 1
                continue
            if stored.state.dim > fv.dim:
                raise ValueError(
                    f"{from_policy} state of {user_id!r} has D={stored.state.dim}, more than"
                    f" {to_policy}'s {fv.name} (D={fv.dim})"
                )
            state = replace(stored.state.migrated(fv.name, fv.dim), policy=to_policy)
            if await store.compare_and_set(user_id, to_policy, 0, state) is None:
                skipped += 1
            else:
                migrated += 1
        cursor = rows[-1][0]
        await store.set_migration_cursor(from_policy, to_policy, cursor)
        report = replace(
            report,
            migrated=report.migrated + migrated,
            skipped=report.skipped + skipped,
            unreadable=report.unreadable + unreadable,
            last_user=cursor,
        )
        pages += 1
        if on_page is not None:
            on_page(report)
    return report
