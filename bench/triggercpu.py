"""Capture cost per transaction, measured in one session with no client round trips.

pgbench at 8 clients on 2 shared cores mixes the trigger's cost with the neighbours' load and
with pgbench's own CPU. This measures the trigger alone: a procedure on the Site runs the
WhatsApp transaction (insert a message, update its status, COMMIT) N times in a loop, with
synchronous_commit off so no WAL flush is waited for. Time per transaction against the same
loop on the same tables without capture, sides interleaved, medians over reps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.env import SITE_TEMPLATE, World, connect, uncapture
from bench.stats import median
from bench.writecost import NO_NOTIFY, NO_SECDEF, NO_SET, NotApplicable, _other_trigger, _rewrite

LOOP = """
CREATE PROCEDURE public.bench_loop(n integer) LANGUAGE plpgsql AS $$
DECLARE
    m bigint;
    c integer;
BEGIN
    FOR i IN 1..n LOOP
        c := 1 + i % 1000;
        INSERT INTO public.whatsapp_messages (message_id, conversation_id, phone_number, direction, content)
        VALUES ('wamid.loop.' || gen_random_uuid(), c, '+49151' || lpad(c::text, 7, '0'), 'outbound',
                'Gerne! Ich schicke Ihnen das Angebot gleich.')
        RETURNING id INTO m;
        UPDATE public.whatsapp_messages SET status = 'delivered', delivered_at = now(), updated_at = now()
        WHERE id = m;
        COMMIT;
    END LOOP;
END $$
"""

# name -> (label, setup on a fresh copy of the Site template)
VARIANTS: dict[str, tuple[str, Callable[[Any], None] | None]] = {
    "none": ("no capture (reference)", lambda conn: uncapture(conn.info.dsn)),
    "dbsync": ("dbsync capture", None),
    "dbsync-no-set": ("dbsync without the function's SET clauses", _rewrite(NO_SET)),
    "dbsync-no-secdef": ("dbsync without SECURITY DEFINER", _rewrite(NO_SECDEF)),
    "dbsync-no-notify": ("dbsync without the NOTIFY (the doorbell is still read)", _rewrite(NO_NOTIFY)),
    "naive-no-notify": (
        "naive: plain PL/pgSQL row trigger, to_jsonb(NEW) into a log",
        _other_trigger("bench.naive_capture()"),
    ),
}


def _db(name: str) -> str:
    return "bench_loop_" + name.replace("-", "_")


def run(w: World, transactions: int, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    dsns: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, (_, setup) in VARIANTS.items():
        dsn = w.site.create_db(_db(name), SITE_TEMPLATE)
        try:
            with connect(dsn) as conn:
                if setup is not None:
                    setup(conn)
                conn.execute(LOOP)
                conn.execute("CALL bench.seed(1000)")
                conn.execute("VACUUM ANALYZE")
        except NotApplicable as exc:
            skipped[name] = str(exc)
            w.site.drop_db(_db(name))
            continue
        dsns[name] = dsn
    us: dict[str, list[float]] = {n: [] for n in dsns}
    try:
        for rep in range(reps):
            for name, dsn in dsns.items():
                with connect(dsn) as conn:
                    conn.execute("SET synchronous_commit = off")
                    conn.execute("CALL public.bench_loop(200)")  # warm the caches
                    started = time.perf_counter()
                    conn.execute("CALL public.bench_loop(%s)", (transactions,))
                    us[name].append((time.perf_counter() - started) / transactions * 1e6)
            log("  trigger cpu rep {}: {}".format(rep + 1, ", ".join(f"{n} {v[-1]:.0f} us" for n, v in us.items())))
    finally:
        for name in dsns:
            w.site.drop_db(_db(name))
    base = median(us["none"])
    return {
        "transactions": transactions,
        "reps": reps,
        "labels": {n: VARIANTS[n][0] for n in dsns},
        "skipped": skipped,
        "us_per_tx": {n: [round(x, 1) for x in v] for n, v in us.items()},
        "median_us": {n: round(median(v), 1) for n, v in us.items()},
        "overhead_us": {n: round(median(v) - base, 1) for n, v in us.items()},
        # One session, CPU-bound: throughput relative to no capture.
        "ratio": {n: round(base / median(v), 3) for n, v in us.items()},
    }
