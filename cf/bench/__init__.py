"""Benchmarks of generated videos: the consistency runner, results tables and plots.

- `cf.bench.entries`: `Entry` (a method at a memory policy with its generator), `plan_entries`, and
  `BenchResult` (what a benchmark measured: consistency makes it, report writes it).
- `cf.bench.consistency`: `run_consistency` (what `cf bench consistency` and the pipeline's bench stage
  run); it re-exports the names of `cf.bench.entries`.
- `cf.bench.report`: the files a benchmark writes (videos, results CSV/Markdown/JSON, plots).
- `cf.bench.tables`: Markdown tables in the paper's layouts from a DataFrame of per-run rows (the
  column contract is in its docstring).
- `cf.bench.plots`: consistency vs time, revisit error vs lag, frame strips.
"""
