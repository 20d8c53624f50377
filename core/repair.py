"""Repair drift through the sync log, so that the daemon applies fixes in order with live changes.

Writing the Agent DB directly would race replication: an event already in the log could
overwrite the fix, or the fix could overwrite a newer change. Instead each differing key gets a
resync event on the Site DB (its current row, or a delete), and the check is repeated once the
daemon has applied those events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dbsync import rls
from dbsync.catchup import CatchUp, CatchUpError, site_snapshot
from dbsync.errors import DbsyncError
from dbsync.reconcile import ComparedTable, Comparer, Seen, TableDiff, recheck
from dbsync.resync import resync_keys

log = logging.getLogger("dbsync.reconcile")


class RepairPending(DbsyncError):
    """The fixes are in the sync log but were not applied (yet)."""

    exit_code = 1


@dataclass(frozen=True)
class Repair:
    before: TableDiff
    after: TableDiff
    updated: int
    deleted: int


def repair(comparer: Comparer, catchup: CatchUp, target: ComparedTable, diff: TableDiff) -> Repair:
    if target.insert_only:
        # No key to resync a row by: nothing is written, and the difference stays reported.
        log.warning(
            "%s is replicated insert-only: --repair cannot fix it (its rows have no key to copy or delete by); "
            "to rebuild it: `dbsync tables remove`, empty the Agent table, then `dbsync tables add --insert-only "
            "--backfill` (the Site table's rows are copied in the transaction that installs its capture)",
            target.label,
        )
        return Repair(diff, diff, 0, 0)
    keys = diff.keys()
    rls.require_definer_reads_all(comparer.site, [(target.site.schema, target.site.name)], "repair")
    updated, deleted = resync_keys(comparer.site, target.site.schema, target.site.name, keys)
    log.info("%s: logged %d upsert(s) and %d delete(s); waiting for them to be applied", target.label, updated, deleted)
    try:
        catchup.wait(site_snapshot(comparer.site), [target.table_id])
    except CatchUpError as exc:
        raise RepairPending(
            f"{target.label}: the fixes for {len(keys)} row(s) are queued in the sync log but not applied: {exc}; "
            "then run `dbsync reconcile --deep` again to verify"
        ) from None
    after = TableDiff(target.label, target.table_id, diff.site_rows, diff.agent_rows)
    # Nothing seen yet: a key that still differs must differ the same way in two rounds.
    unseen: Seen = {key: (None, None) for key in keys}
    return Repair(diff, recheck(comparer, catchup, target, unseen, after), updated, deleted)
