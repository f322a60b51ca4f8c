"""Results tables in the paper's layouts (Markdown, via pandas) from a DataFrame of per-run rows.

The benchmark runner (`cf.bench.consistency`) writes these rows to ``results/runs.csv`` and logs the
same numbers to MLflow as ``bench/<column>`` metrics, so a DataFrame built from MLflow runs (metric
names without the ``bench/`` prefix, tags and params as extra columns) renders with the same functions.

The row contract: one row per benchmarked generator (method x memory policy x weights). Column names
are MLflow-safe (no '@'), so ``bench/<column>`` is stored exactly as written.

Identity (strings):
  ``method``       self_forcing | longlive | context_forcing (the MLflow tag `method`)
  ``memory``       full | sliding | sink | slowfast (the MLflow tag `memory`)
  ``weights``      optional: ``trained`` or ``untrained`` (MLflow tag `weights`); untrained rows are
                   labelled "[untrained]" in every table
  ``data.fps``     optional (MLflow param): frames per second of world time; adds lags in seconds

Scores (floats; NaN or missing = not measured, shown as "-"). Consistencies are cosines in [0, 1]
and are shown x100 as in the paper:
  ``first_frame_<backbone>_at_<T>s``  first-frame consistency of the segment ending at T seconds, per
                                   feature backbone (e.g. ``first_frame_imagenet_at_10s``); Table 1
  ``subject_consistency``, ``background_consistency``  VBench's formula (BG / Subj)
  ``motion_smoothness``, ``dynamic_degree``             VBench-style, in [0, 1]
  ``total``                        mean of the four VBench-style scores above (cf's stand-in for
                                   VBench's 16-dimension Total)
  ``drift_first_to_last``, ``drift_slope_per_s``        change of the first-frame curve (main backbone)
  ``effective_context_s``          revisit-based effective context; ``effective_context_is_lower_bound``
                                   (1 = every measured lag passed, so the context is at least this)
  ``revisit_psnr``, ``revisit_lpips``                   over all revisit pairs
  ``revisit_psnr_lag_<L>``, ``revisit_lpips_lag_<L>``   per revisit lag of L frames
  ``fps``                          video frames per second measured while generating
  ``ms_per_chunk``                 median wall milliseconds per chunk
"""

from __future__ import annotations

import math
import re

import pandas as pd

from cf.errors import CfError

FIRST_FRAME = re.compile(r"^first_frame_(?P<backbone>[a-z0-9]+)_at_(?P<t>\d+(?:\.\d+)?)s$")
REVISIT_LAG = re.compile(r"^revisit_(?P<what>psnr|lpips)_lag_(?P<lag>\d+)$")
IDENTITY = ("method", "memory")

# Table 2 (summary) columns: (row column, header, format, scale)
SUMMARY = (
    ("fps", "FPS", ".1f", 1.0),
    ("total", "Total", ".2f", 100.0),
    ("background_consistency", "BG", ".2f", 100.0),
    ("subject_consistency", "Subj", ".2f", 100.0),
    ("dynamic_degree", "Dynamic", ".2f", 100.0),
    ("motion_smoothness", "Smooth", ".2f", 100.0),
    ("drift_first_to_last", "Drift", "+.2f", 100.0),
    ("effective_context_s", "Context (s)", ".2f", 1.0),
)


def first_frame_column(backbone: str, t: float) -> str:
    """The column (and ``bench/`` metric) name of first-frame consistency at segment end `t` s."""
    return f"first_frame_{backbone}_at_{t:g}s"


def revisit_column(what: str, lag: int) -> str:
    """The column name of the revisit `what` (psnr | lpips) at a lag of `lag` frames."""
    return f"revisit_{what}_lag_{int(lag)}"


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
        m = FIRST_FRAME.match(str(col))
        if m:
            out.setdefault(m["backbone"], []).append((float(m["t"]), str(col)))
    return {b: sorted(v) for b, v in out.items()}


def revisit_lags(df: pd.DataFrame, what: str = "psnr") -> list[tuple[int, str]]:
    """[(lag in frames, column), ...] sorted by lag for the revisit measure `what`."""
    found = [
        (int(m["lag"]), str(c)) for c in df.columns if (m := REVISIT_LAG.match(str(c))) and m["what"] == what
    ]
    return sorted(found)


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame of strings -> a GitHub Markdown table (first column left, the rest right-aligned)."""
    align = ["left"] + ["right"] * (len(table.columns) - 1)
    return table.to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def table1(df: pd.DataFrame) -> str:
    """Table 1: first-frame consistency (x100) per segment end, per backbone, then BG / Subj."""
    _check(df, "table 1")
    cols = first_frame_columns(df)
    if not cols:
        raise CfError("table 1: no first_frame_<backbone>_at_<T>s columns in the rows")
    out = {"model": [row_label(r) for _, r in df.iterrows()]}
    for backbone, series in cols.items():
        for t, col in series:
            out[f"{backbone} @{t:g}s"] = [fmt(v, ".2f", 100.0) for v in df[col]]
    for col, head in (("background_consistency", "BG"), ("subject_consistency", "Subj")):
        out[head] = [fmt(v, ".2f", 100.0) for v in df[col]] if col in df else ["-"] * len(df)
    return markdown(pd.DataFrame(out))


def table2(df: pd.DataFrame) -> str:
    """Table 2-style summary: FPS, Total, BG, Subj, Dynamic, Smooth (x100), Drift (x100, first to last
    segment), effective context in seconds ("≥" where only a lower bound)."""
    _check(df, "table 2")
    out = {"model": [row_label(r) for _, r in df.iterrows()]}
    for col, head, spec, scale in SUMMARY:
        cells = [fmt(v, spec, scale) for v in df[col]] if col in df else ["-"] * len(df)
        if col == "effective_context_s" and "effective_context_is_lower_bound" in df:
            bound = df["effective_context_is_lower_bound"].tolist()
            cells = [f"≥{c}" if c != "-" and b == 1 else c for c, b in zip(cells, bound)]
        out[head] = cells
    return markdown(pd.DataFrame(out))


def revisit_table(df: pd.DataFrame, what: str = "psnr") -> str:
    """Revisit error by lag: one row per lag (frames, and seconds where ``data.fps`` is known), one
    column per model; PSNR in dB (1 decimal) or LPIPS (3 decimals)."""
    _check(df, "revisit table")
    lags = revisit_lags(df, what)
    if not lags:
        raise CfError(f"revisit table: no revisit_{what}_lag_<L> columns in the rows")
    fps = df["data.fps"].dropna().unique() if "data.fps" in df else []
    spec = ".1f" if what == "psnr" else ".3f"
    out: dict[str, list[str]] = {"lag (frames)": [str(lag) for lag, _ in lags]}
    if len(fps) == 1:
        out["lag (s)"] = [f"{lag / float(fps[0]):g}" for lag, _ in lags]
    for _, r in df.iterrows():
        out[row_label(r)] = [fmt(r[col], spec) for _, col in lags]
    return markdown(pd.DataFrame(out))
