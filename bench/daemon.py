"""`dbsync run` for the benchmarks: the same click command, without the `dbsync` command group.

The group imports every other command; the benchmarks should not fail because one of them is
half-edited in the work tree. Usage: python -m bench.daemon [--once] (DSNs from the environment).
"""

from __future__ import annotations

import logging
import sys

from dbsync.cli.run import run

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncpg").setLevel(logging.CRITICAL)
    sys.exit(run.main(args=sys.argv[1:], prog_name="dbsync run", standalone_mode=True))
