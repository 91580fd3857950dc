"""Speed runs and correctness cross-checks, run from the repository root as modules (`python -m benchmarks.bench_lrcl
...`), so that the scripts share `benchmarks.common` without path edits. Not part of the installed package."""
