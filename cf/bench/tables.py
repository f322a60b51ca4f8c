"""Results tables in the paper's layouts (Markdown, via pandas) from a DataFrame of per-run rows.

The benchmark runner (`cf.bench.consistency`) writes these rows to ``results/runs.csv`` and logs the
same numbers to MLflow as ``bench/<column>`` metrics, so a DataFrame built from MLflow runs (metric
names without the ``bench/`` prefix, tags and params as extra columns) renders with the same functions.

The row contract: one row per benchmarked generator (method x memory policy x weights). Column names
are MLflow-safe (no '@'), so ``bench/<column>`` is stored exactly as written; the score columns are
named by `cf.metrics.columns` (the one place that names scores, for the benchmark and the stage
evaluations alike).

Identity (strings):
  ``method``       self_forcing | longlive | context_forcing (the MLflow tag `method`)
  ``memory``       full | sliding | sink | slowfast (the MLflow tag `memory`)
  ``weights``      optional: ``trained`` or ``untrained`` (MLflow tag `weights`); untrained rows are
                   labelled "[untrained]" in every table
  ``data.fps``     optional (MLflow param)

Scores: see `cf.metrics.columns`; also ``fps`` (video frames per second while generating) and
``ms_per_chunk`` (median wall milliseconds per chunk).
"""

from __future__ import annotations

import math

import pandas as pd

from cf.errors import CfError
from cf.metrics import columns

IDENTITY = ("method", "memory")
ROLE_HEAD = {"both": "Consist.", "subject": "Subj", "background": "BG"}


def first_frame_column(backbone: str, t: float) -> str:
    return columns.first_frame_column(backbone, t)


def fmt(value, spec: str = ".2f", scale: float = 1.0) -> str:
    """A number for a table cell; None / NaN -> "-"."""
    if value is None:
        return "-"
    x = float(value)
    return "-" if math.isnan(x) else format(x * scale, spec)


def row_label(row) -> str:
    """``method (memory)``, with ``[untrained]`` when the row's weights are untrained."""
    label = f"{row['method']} ({row['memory']})"
    if str(row.get("weights", "trained")) == "untrained":
        label += " [untrained]"
    return label


def _check(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in IDENTITY if c not in df.columns]
    if missing:
        raise CfError(
            f"{what}: the rows have no column(s) {missing}; every row needs 'method' and 'memory' "
            f"(see cf.bench.tables for the column contract)"
        )


def first_frame_columns(df: pd.DataFrame) -> dict[str, list[tuple[float, str]]]:
    """{backbone: [(segment end s, column), ...] sorted by time}, backbones in column order."""
    out: dict[str, list[tuple[float, str]]] = {}
    for col in df.columns:
        m = columns.FIRST_FRAME.match(str(col))
        if m:
            out.setdefault(m["backbone"], []).append((float(m["t"]), str(col)))
    return {b: sorted(v) for b, v in out.items()}


def consistency_heads(df: pd.DataFrame, term: str = "clips") -> list[tuple[str, str]]:
    """[(column, header)] of the consistency columns of `term` in the rows: one column named after its
    backbone when one backbone computes both of VBench's consistencies, else BG and Subj."""
    found = [(c, role, bb) for c, role, bb, t in columns.consistency_columns(df.columns) if t == term]
    suffix = {"clips": "", "long_range": " long-range", "whole": " whole"}[term]
    return [(c, f"{ROLE_HEAD[role]}{suffix} ({bb})") for c, role, bb in found]


def revisit_bins(df: pd.DataFrame, what: str = "retention") -> list[tuple[float, float, str]]:
    """[(lo_s, hi_s, column)] of the revisit lag bins measured for `what`, sorted by lag."""
    return [b for b in columns.revisit_bins(df.columns, what) if df[b[2]].notna().any()]


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame of strings -> a GitHub Markdown table (first column left, the rest right-aligned)."""
    align = ["left"] + ["right"] * (len(table.columns) - 1)
    return table.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def _cells(df: pd.DataFrame, col: str, spec: str, scale: float) -> list[str]:
    return [fmt(v, spec, scale) for v in df[col]] if col in df else ["-"] * len(df)


def table1(df: pd.DataFrame) -> str:
    """Table 1: first-frame consistency (x100) per segment end, per backbone, then the consistency columns
    (VBench-Long, and its long-range term)."""
    _check(df, "table 1")
    cols = first_frame_columns(df)
    if not cols:
        raise CfError("table 1: no first_frame_<backbone>_at_<T>s columns in the rows")
    out = {"model": [row_label(r) for _, r in df.iterrows()]}
    for backbone, series in cols.items():
        for t, col in series:
            out[f"{backbone} @{t:g}s"] = _cells(df, col, ".2f", 100.0)
    for term in ("clips", "long_range"):
        for col, head in consistency_heads(df, term):
            out[head] = _cells(df, col, ".2f", 100.0)
    return markdown(pd.DataFrame(out))


def table2(df: pd.DataFrame) -> str:
    """Table 2-style summary: FPS, Total, the consistency columns (x100), Dynamic (and Moving, the share of
    frame pairs that move), Smooth, Drift (x100,
    first to last segment), realism (Fréchet distance, lower is better), revisit retention over all pairs
    and the effective context in seconds ("≥" where only a lower bound)."""
    _check(df, "table 2")
    out = {"model": [row_label(r) for _, r in df.iterrows()]}
    out["FPS"] = _cells(df, "fps", ".1f", 1.0)
    out["Total"] = _cells(df, "total", ".2f", 100.0)
    for term in ("clips", "long_range"):
        for col, head in consistency_heads(df, term):
            out[head] = _cells(df, col, ".2f", 100.0)
    out["Dynamic"] = _cells(df, "dynamic_degree", ".2f", 100.0)
    out["Moving"] = _cells(df, "moving_fraction", ".2f", 100.0)
    out["Smooth"] = _cells(df, "motion_smoothness", ".2f", 100.0)
    out["Drift"] = _cells(df, "drift_first_to_last", "+.2f", 100.0)
    for col in df.columns:
        m = columns.REALISM.match(str(col))
        if m:
            out[f"FD ({m['backbone']})"] = _cells(df, col, ".1f", 1.0)
    out["Retention"] = _cells(df, "revisit_retention", ".2f", 1.0)
    cells = _cells(df, "effective_context_s", ".2f", 1.0)
    if "effective_context_is_lower_bound" in df:
        bound = df["effective_context_is_lower_bound"].tolist()
        cells = [f"≥{c}" if c != "-" and b == 1 else c for c, b in zip(cells, bound)]
    out["Context (s)"] = cells
    return markdown(pd.DataFrame(out))


def revisit_table(df: pd.DataFrame, what: str = "retention") -> str:
    """A revisit measure by lag bin: one row per bin (seconds), one column per model; retention (2
    decimals), PSNR / chance PSNR in dB (1 decimal) or LPIPS (3 decimals)."""
    _check(df, "revisit table")
    bins = revisit_bins(df, what)
    if not bins:
        raise CfError(f"revisit table: no revisit_{what}_lag_<lo>-<hi>s columns in the rows")
    spec = {"retention": ".2f", "lpips": ".3f", "sink_share": ".2f"}.get(what, ".1f")
    out: dict[str, list[str]] = {"lag (s)": [f"{lo:g}-{hi:g}" for lo, hi, _ in bins]}
    for _, r in df.iterrows():
        out[row_label(r)] = [fmt(r[col], spec) for _, _, col in bins]
    return markdown(pd.DataFrame(out))
