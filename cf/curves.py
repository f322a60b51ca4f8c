"""What the notebooks plot, as long-form DataFrames: seed-mean pipeline rows (from MLflow, or the tables
committed under `results/` on a fresh clone), first-frame consistency and revisit curves, the rollout and
training benchmarks' records, and the stages' loss histories."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cf import seedstats, tracking
from cf.config.load import ROOT
from cf.results import (
    GROUP,
    RESULTS,
    UNGROUPED,
    bench_rows,
    latest,
    pipeline_runs,
    seed_means,
    with_committed_seeds,
)


def load_rows(cfg: DictConfig, results_dir: str | Path = RESULTS) -> tuple[pd.DataFrame, str]:
    """Seed-mean pipeline rows (with their intervals) and where they came from: the MLflow store's
    finished pipeline runs plus the per-seed rows committed under `results_dir` (`<grid>.seeds.csv`: other
    machines' and earlier sessions' runs, as `cf tables` merges them), and, for a (preset, grid) with no
    per-seed rows anywhere, its committed seed-mean table (`results_dir/<preset>/<grid>.csv`)."""
    stored = pipeline_runs(cfg)
    runs = with_committed_seeds(stored, results_dir)
    parts, sources = [], []
    if not runs.empty:
        parts.append(seed_means(latest(runs)))
        if not stored.empty:
            sources.append(f"MLflow ({cfg.tracking.experiment})")
        if len(runs) > len(stored):
            sources.append(f"{len(runs) - len(stored)} committed per-seed row(s)")
    have = {(str(p), str(a)) for p, a in zip(parts[0]["preset"], parts[0]["ablation"])} if parts else set()
    # the seed-mean tables only (not their .paired.csv or .seeds.csv companions)
    files = sorted(f for f in Path(results_dir).glob("*/*.csv") if f.suffixes == [".csv"])
    tables = []
    for f in files:
        t = pd.read_csv(f, keep_default_na=False, na_values=[""])
        if not {"preset", "ablation", "variant"} <= set(t.columns):
            continue
        for c in ("ablation", "variant"):
            t[c] = t[c].fillna("").astype(str)
        t = t[[(str(p), a) not in have for p, a in zip(t["preset"], t["ablation"])]]
        if len(t):
            tables.append(t)
    if tables:
        parts += tables
        sources.append(f"{len(tables)} committed table(s) in {results_dir}")
    if not parts:
        return pd.DataFrame(columns=[*GROUP, "label"]), "no runs yet"
    from cf.bench.tables import row_label

    rows = pd.concat(parts, ignore_index=True)
    rows["label"] = [row_label(r) for _, r in bench_rows(rows).iterrows()]
    return rows, " + ".join(sources)


def first_frame_curves(rows: pd.DataFrame) -> pd.DataFrame:
    """Long form of first-frame consistency: preset, ablation, label, backbone, t (s), value, lo, hi (its
    95% interval over seeds; NaN with one seed)."""
    from cf.metrics.columns import FIRST_FRAME

    out = []
    for c in rows.columns:
        m = FIRST_FRAME.match(c.removeprefix("bench/")) if c.startswith("bench/") else None
        if m:
            for _, r in rows[rows[c].notna()].iterrows():
                out.append(
                    {
                        "preset": r["preset"],
                        "ablation": r["ablation"] or UNGROUPED,
                        "label": r["label"],
                        "backbone": m["backbone"],
                        "t": float(m["t"]),
                        "value": float(r[c]),
                        **seedstats.bounds(r, c),
                    }
                )
    return pd.DataFrame(out, columns=["preset", "ablation", "label", "backbone", "t", "value", "lo", "hi"])


def revisit_curves(rows: pd.DataFrame, what: str = "retention") -> pd.DataFrame:
    """Long form of a revisit measure by lag bin: preset, ablation, label, lo_s, hi_s, value, lo, hi."""
    from cf.metrics.columns import REVISIT_LAG

    out = []
    for c in rows.columns:
        m = REVISIT_LAG.match(c.removeprefix("bench/")) if c.startswith("bench/") else None
        if m and m["what"] == what:
            for _, r in rows[rows[c].notna()].iterrows():
                out.append(
                    {
                        "preset": r["preset"],
                        "ablation": r["ablation"] or UNGROUPED,
                        "label": r["label"],
                        "lo_s": float(m["lo"]),
                        "hi_s": float(m["hi"]),
                        "value": float(r[c]),
                        **seedstats.bounds(r, c),
                    }
                )
    return pd.DataFrame(out, columns=["preset", "ablation", "label", "lo_s", "hi_s", "value", "lo", "hi"])


def lag_centres(lo_s, hi_s) -> np.ndarray:
    """Where lag bins sit on a log axis (s): the geometric centre of [lo, hi] (lo floored at 0.25 s);
    an open last bin (hi infinite) sits at 1.25 lo. Takes any array-likes, empty ones included."""
    lo = np.asarray(lo_s, dtype=float)
    hi = np.asarray(hi_s, dtype=float)
    return np.where(np.isfinite(hi), np.sqrt(np.maximum(lo, 0.25) * hi), 1.25 * lo)


def rollout_curves(bench_dir: str | Path = ROOT / "benchmarks" / "results") -> pd.DataFrame:
    """Per chunk of `benchmarks/results/rollout_<preset>.json`: preset, policy, chunk, ms, kv_mib."""
    import json

    out = []
    for f in sorted(Path(bench_dir).glob("rollout_*.json")):
        doc = json.loads(f.read_text())
        for policy, run in doc.get("runs", {}).items():
            for i, (s, b) in enumerate(zip(run["chunk_latency_s"], run["kv_bytes"])):
                out.append(
                    {
                        "preset": doc["preset"],
                        "policy": policy,
                        "chunk": i + 1,
                        "ms": 1e3 * s,
                        "kv_mib": b / 2**20,
                    }
                )
    return pd.DataFrame(out, columns=["preset", "policy", "chunk", "ms", "kv_mib"])


def train_benchmarks(bench_dir: str | Path = ROOT / "benchmarks" / "results") -> pd.DataFrame:
    """`benchmarks/results/train_<preset>.json` rows: preset, stage, step_ms, mfu, samples_per_s."""
    import json

    out = []
    for f in sorted(Path(bench_dir).glob("train_*.json")):
        for r in json.loads(f.read_text()).get("stages", []):
            out.append(
                {
                    "preset": r["preset"],
                    "stage": r["stage"],
                    "step_ms": 1e3 * r["step_s"],
                    "mfu": r["mfu"],
                    "samples_per_s": r["samples_per_s"],
                }
            )
    return pd.DataFrame(out, columns=["preset", "stage", "step_ms", "mfu", "samples_per_s"])


def training_curves(cfg: DictConfig, pattern: str = "loss") -> pd.DataFrame:
    """Loss histories of each latest pipeline's stage runs (tags `run.<stage>`, cached stages
    included): preset, label, stage, metric, step, value. Metrics whose name contains `pattern`."""
    df = latest(pipeline_runs(cfg))
    cols = ["preset", "label", "stage", "metric", "step", "value"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    from cf.bench.tables import row_label
    from cf.store import run_exists

    client = tracking.client(cfg)
    out, seen = [], set()
    for (_, r), (_, b) in zip(df.iterrows(), bench_rows(df).iterrows()):
        parent = client.get_run(r["run_id"])
        for tag, run_id in sorted(parent.data.tags.items()):
            if not tag.startswith("run.") or (run_id, row_label(b)) in seen:
                continue
            seen.add((run_id, row_label(b)))
            stage = tag.removeprefix("run.")
            if not run_exists(client, run_id):  # e.g. a pipeline logged before its cache was re-recorded
                print(f"training curves: skipping {stage} of {row_label(b)}: its run {run_id} is not in this "
                      "store (run `make ablate` again with the same settings to record it from the cache)",
                      file=sys.stderr)
                continue
            for key in client.get_run(run_id).data.metrics:
                if pattern in key:
                    for m in client.get_metric_history(run_id, key):
                        out.append(
                            {
                                "preset": r["preset"],
                                "label": row_label(b),
                                "stage": stage,
                                "metric": key,
                                "step": m.step,
                                "value": m.value,
                            }
                        )
    return pd.DataFrame(out, columns=cols)
