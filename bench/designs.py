"""Capture designs, measured side by side before one is built (issue 10's "chosen by measurement").

Each variant is a copy of the Site template with public.whatsapp_messages captured one way:
no capture (the reference), dbsync's shipped capture (a PL/pgSQL row trigger writing an hstore
image of the whole row), and two key-only designs from bench/sql/capture_designs.sql (a row
trigger, and statement triggers with transition tables writing one log row per statement).
Three workloads, sides interleaved rep by rep, medians:

* the WhatsApp transaction (insert a message, update its status) in a server-side loop,
  microseconds per transaction (as bench/triggercpu.py);
* one statement changing 200k rows: INSERT, UPDATE of the status column, DELETE; seconds;
* WAL per UPDATE of the status of a message whose body is 100 kB (TOASTed), bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.env import BENCH_DIR, SITE_TEMPLATE, World, connect, uncapture
from bench.stats import median
from bench.triggercpu import LOOP

VARIANTS = {
    "none": "no capture (reference)",
    "dbsync": "dbsync's capture: row trigger, whole-row hstore image",
    "key-row": "key-only row trigger, one log row per changed row",
    "key-statement": "key-only statement triggers, one log row per statement carrying its keys",
}

ROW_TRIGGER = """
CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON public.whatsapp_messages
FOR EACH ROW EXECUTE FUNCTION bench_keys.capture_row()
"""
STATEMENT_TRIGGERS = (
    "CREATE TRIGGER bench_capture_i AFTER INSERT ON public.whatsapp_messages REFERENCING NEW TABLE AS dbsync_new "
    "FOR EACH STATEMENT EXECUTE FUNCTION bench_keys.capture_statement()",
    "CREATE TRIGGER bench_capture_u AFTER UPDATE ON public.whatsapp_messages "
    "REFERENCING OLD TABLE AS dbsync_old NEW TABLE AS dbsync_new "
    "FOR EACH STATEMENT EXECUTE FUNCTION bench_keys.capture_statement()",
    "CREATE TRIGGER bench_capture_d AFTER DELETE ON public.whatsapp_messages REFERENCING OLD TABLE AS dbsync_old "
    "FOR EACH STATEMENT EXECUTE FUNCTION bench_keys.capture_statement()",
)

BULK = {
    "insert": "INSERT INTO public.whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
    "SELECT 'wamid.bulk.' || g, 1 + g %% 1000, bench.phone(1 + g %% 1000), 'inbound', bench.text_for(g) "
    "FROM generate_series(1, %(rows)s) g",
    "update": "UPDATE public.whatsapp_messages SET status = 'delivered', delivered_at = now()",
    "delete": "DELETE FROM public.whatsapp_messages",
}


def _setup(name: str) -> Callable[[psycopg.Connection], None]:
    def setup(conn: psycopg.Connection) -> None:
        if name == "dbsync":
            return
        uncapture(conn.info.dsn)
        if name == "none":
            return
        conn.execute((BENCH_DIR / "sql" / "capture_designs.sql").read_text())
        for statement in (ROW_TRIGGER,) if name == "key-row" else STATEMENT_TRIGGERS:
            conn.execute(statement)

    return setup


def _db(name: str) -> str:
    return "bench_design_" + name.replace("-", "_")


def _loop(dsn: str, transactions: int) -> float:
    with connect(dsn) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("CALL public.bench_loop(200)")  # warm the caches
        started = time.perf_counter()
        conn.execute("CALL public.bench_loop(%s)", (transactions,))
        return (time.perf_counter() - started) / transactions * 1e6


def bulk_statements(w: World, dsn: str, rows: int) -> dict[str, float]:
    """Seconds taken by each of BULK's statements, on an emptied table after a checkpoint."""
    took: dict[str, float] = {}
    with connect(dsn) as conn:
        conn.execute("DELETE FROM public.whatsapp_messages")
        conn.execute("VACUUM public.whatsapp_messages")
        w.site.checkpoint()
        for op, statement in BULK.items():
            started = time.perf_counter()
            conn.execute(statement, {"rows": rows} if op == "insert" else None)
            took[op] = time.perf_counter() - started
        conn.execute("VACUUM public.whatsapp_messages")
    return took


def _wal_per_update(dsn: str, messages: int) -> float:
    """WAL bytes per status UPDATE of a message with a 100 kB body, past the first touch of each
    page after the checkpoint (full-page images are paid once whatever the capture)."""
    with connect(dsn) as conn:
        conn.execute("DELETE FROM public.whatsapp_messages")
        conn.execute(
            "INSERT INTO public.whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
            "SELECT 'wamid.big.' || g, 1, bench.phone(1), 'inbound', bench.blob(100000) FROM generate_series(1, %s) g",
            (messages,),
        )
        ids = [r[0] for r in conn.execute("SELECT id FROM public.whatsapp_messages ORDER BY id").fetchall()]
        for status in ("delivered", "read"):
            before = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]  # type: ignore[index]
            for m in ids:
                conn.execute("UPDATE public.whatsapp_messages SET status = %s WHERE id = %s", (status, m))
            after = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]  # type: ignore[index]
        wal = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (after, before)).fetchone()[0]  # type: ignore[index]
        conn.execute("DELETE FROM public.whatsapp_messages")
    return float(wal) / len(ids)


def run(w: World, transactions: int, rows: int, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    dsns: dict[str, str] = {}
    for name in VARIANTS:
        dsn = w.site.create_db(_db(name), SITE_TEMPLATE)
        with connect(dsn) as conn:
            _setup(name)(conn)
            conn.execute(LOOP)
            conn.execute("CALL bench.seed(1000)")
            conn.execute("VACUUM ANALYZE")
        dsns[name] = dsn
    loop: dict[str, list[float]] = {n: [] for n in dsns}
    bulk: dict[str, dict[str, list[float]]] = {n: {op: [] for op in BULK} for n in dsns}
    wal: dict[str, list[float]] = {n: [] for n in dsns}
    try:
        for rep in range(reps):
            for name, dsn in dsns.items():
                loop[name].append(_loop(dsn, transactions))
                for op, seconds in bulk_statements(w, dsn, rows).items():
                    bulk[name][op].append(seconds)
                wal[name].append(_wal_per_update(dsn, 20))
            log(
                f"  designs rep {rep + 1}: "
                + ", ".join(f"{n} {loop[n][-1]:.0f} us/tx, update {bulk[n]['update'][-1]:.2f} s" for n in dsns)
            )
    finally:
        for name in dsns:
            w.site.drop_db(_db(name))
    ref_loop = median(loop["none"])
    ref_wal = median(wal["none"])
    return {
        "transactions": transactions,
        "rows": rows,
        "reps": reps,
        "labels": VARIANTS,
        "loop_us_per_tx": {n: [round(x, 1) for x in v] for n, v in loop.items()},
        "loop_ratio": {n: round(ref_loop / median(v), 3) for n, v in loop.items()},
        "bulk_s": {n: {op: [round(x, 3) for x in v] for op, v in ops.items()} for n, ops in bulk.items()},
        "bulk_ratio": {
            n: {op: round(median(bulk["none"][op]) / median(v), 3) for op, v in ops.items()} for n, ops in bulk.items()
        },
        "wal_bytes_per_update": {n: round(median(v)) for n, v in wal.items()},
        "wal_ratio": {n: round(median(v) / ref_wal, 2) for n, v in wal.items()},
    }
