"""Performance benchmarks; each writes benchmarks/results/<name>.json."""
