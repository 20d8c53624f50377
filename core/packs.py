"""What a schema pack registers for write-back, and registering it (`dbsync migrate --pack P --two-way`).

A pack's SQL (sql/packs/P/site, agent) creates its tables and registers the Site -> Agent ones
in the Site's own migration. Write-back cannot be registered that way: the Agent chain's
migrations run before `--two-way` has given the Agent DB a capture chain, and registering checks
both databases (the table and its key on each side), which one database's migration cannot do.
So the pack names its write-back tables here, and `migrate` registers them once both chains are
in, through the same checks as `dbsync tables add --from agent`, as the migrating role: no
superuser (the role needs to own the Agent's tables, as for any trigger).
"""

from __future__ import annotations

from dbsync import tables as registry
from dbsync.db import connect, display_name

# Per pack: the tables whose Agent DB changes go back to the Site DB, with their policy.
WRITE_BACK: dict[str, dict[str, registry.Policy]] = {
    # The Agent DB's automation moves a lead through its stages and scores it; the Site's web
    # app owns the rest of the lead (name, email, ...).
    "whatsapp": {"public.leads": registry.Policy("site-wins", ("stage", "score"))},
}


def write_back_tables(pack_names: list[str]) -> dict[str, registry.Policy]:
    found: dict[str, registry.Policy] = {}
    for name in pack_names:
        found.update(WRITE_BACK.get(name, {}))
    return found


def register_write_back(site_dsn: str, agent_dsn: str, pack_names: list[str]) -> list[str]:
    """Register the packs' write-back tables not registered yet on the Agent DB; their labels."""
    wanted = write_back_tables(pack_names)
    if not wanted:
        return []
    done = []
    with connect(agent_dsn, "Agent") as agent, connect(site_dsn, "Site") as site:
        present = {display_name(t.schema, t.name) for t in registry.listing(agent)}
        for label, policy in wanted.items():
            if label in present:
                continue
            registry.add(agent, site, [label], policy=policy)
            done.append(label)
    return done
