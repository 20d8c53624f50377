"""Columns added and dropped while a writer's session stays open: the capture trigger runs in
that session before and after the ALTER, and its row images must follow the table's current
columns (PL/pgSQL keeps statement plans per session; a plan that expanded the row's columns
once would keep them)."""

from __future__ import annotations

from tests.helpers import DbPair, replicate


def test_images_follow_columns_added_and_dropped_in_the_same_session(pair: DbPair) -> None:
    replicate(pair, "CREATE TABLE public.items (id integer PRIMARY KEY, v text)", "public.items")
    site = pair.site()  # one session throughout
    site.execute("INSERT INTO public.items VALUES (1, 'a')")
    site.execute("ALTER TABLE public.items ADD COLUMN w text DEFAULT 'x'")
    site.execute("INSERT INTO public.items VALUES (2, 'b', 'y')")
    site.execute("UPDATE public.items SET v = 'c' WHERE id = 1")
    site.execute("ALTER TABLE public.items DROP COLUMN v")
    site.execute("INSERT INTO public.items VALUES (3, 'z')")
    site.execute("DELETE FROM public.items WHERE id = 2")
    rows = site.execute(
        "SELECT op, dbsync.image_json(pk)::jsonb, dbsync.image_json(row_image)::jsonb FROM dbsync.sync_log "
        "WHERE table_id = (SELECT table_id FROM dbsync.replicated_tables WHERE table_name = 'items') ORDER BY seq"
    ).fetchall()
    assert [(op, img) for op, _, img in rows] == [
        ("I", {"id": "1", "v": "a"}),
        ("I", {"id": "2", "v": "b", "w": "y"}),
        ("U", {"id": "1", "v": "c", "w": "x"}),  # an update, not a key change
        ("I", {"id": "3", "w": "z"}),  # v is gone, w is there
        ("D", None),
    ]
    assert [pk for _, pk, _ in rows] == [{"id": k} for k in ("1", "2", "1", "3", "2")]
