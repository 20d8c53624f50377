"""Columns added and dropped while a writer's session stays open: the capture trigger runs in
that session before and after the ALTER. It logs keys only; the daemon's reads must follow the
table's current columns (PL/pgSQL keeps statement plans per session; a plan that expanded the
row's columns once would keep them)."""

from __future__ import annotations

import json

from tests.helpers import LOGGED_KEYS, DbPair, assert_same, replicate, sync_once


def test_images_follow_columns_added_and_dropped_in_the_same_session(pair: DbPair) -> None:
    replicate(pair, "CREATE TABLE public.items (id integer PRIMARY KEY, v text)", "public.items")
    site = pair.site()  # one session throughout
    site.execute("INSERT INTO public.items VALUES (1, 'a')")
    site.execute("ALTER TABLE public.items ADD COLUMN w text DEFAULT 'x'")
    site.execute("INSERT INTO public.items VALUES (2, 'b', 'y')")
    site.execute("UPDATE public.items SET v = 'c' WHERE id = 1")
    rows = [(op, json.loads(key), image is None) for _, _, _, op, key, image in site.execute(LOGGED_KEYS, (0,))]
    # Keys only (0006_site_key_capture), and an update is an update, not a key change.
    assert rows == [("I", {"id": "1"}, True), ("I", {"id": "2"}, True), ("U", {"id": "1"}, True)]
    pair.agent().execute("ALTER TABLE public.items ADD COLUMN w text DEFAULT 'x'")
    sync_once(pair)
    assert_same(pair, ["public.items"])

    # The daemon reads each row with the table's current columns.
    site.execute("ALTER TABLE public.items DROP COLUMN v")
    site.execute("INSERT INTO public.items VALUES (3, 'z')")
    site.execute("DELETE FROM public.items WHERE id = 2")
    site.execute("UPDATE public.items SET w = 'q' WHERE id = 1")
    pair.agent().execute("ALTER TABLE public.items DROP COLUMN v")
    sync_once(pair)
    assert_same(pair, ["public.items"])
    assert pair.agent().execute("SELECT id, w FROM public.items ORDER BY id").fetchall() == [(1, "q"), (3, "z")]
