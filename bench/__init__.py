"""dbsync benchmarks: ratios against a reference measured in the same run (see docs/benchmarks.md).

Run from the repository root: `python -m bench.run --quick`.
"""
