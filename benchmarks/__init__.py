"""Performance and quality benchmarks (run from the repository root: python -m benchmarks.run_all)."""
