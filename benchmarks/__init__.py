"""pgconv benchmarks (a repository folder, not part of the installed package): `python -m benchmarks [--quick]`.

Heavy numbers are measured in child processes, one at a time, and reported as ratios against transformers
measured in the same run; they are never asserted in tests (tests/test_benchmarks_quick.py only checks that the
quick modes run). Shared helpers live in `benchmarks.common`; results are in `benchmarks/RESULTS.md`.
"""

__all__: list[str] = []
