"""Benchmark figures (matplotlib, PNG): consistency vs time, revisit error vs lag, frame strips.

The curves read the per-run rows of `cf.bench.tables` (the same DataFrame the tables render, from
``results/runs.csv`` or from MLflow), so notebooks can redraw them from either source. One line per
row, labelled like the tables (``method (memory)``, ``[untrained]`` for random weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cf.bench import tables
from cf.errors import CfError
from cf.utils import atomic_path


def _figure(nrows: int, ncols: int, figsize: tuple[float, float]):
    """A Figure and its axes grid, without pyplot: nothing global changes (no backend is chosen, so
    inline plots in a notebook keep working after a call) and nothing needs closing."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)


def first_frame_vs_time(df: pd.DataFrame, path: str | Path) -> Path:
    """First-frame consistency (x100) against segment end time: a panel per backbone, a line per row."""
    cols = tables.first_frame_columns(df)
    if not cols:
        raise CfError("first_frame_vs_time: no first_frame_<backbone>_at_<T>s columns in the rows")
    fig, axes = _figure(1, len(cols), (5.5 * len(cols), 3.8))
    for ax, (backbone, series) in zip(axes[0], cols.items()):
        t = [s for s, _ in series]
        for _, row in df.iterrows():
            ax.plot(t, [100 * float(row[c]) for _, c in series], marker="o", label=tables.row_label(row))
        ax.set_xlabel("time (s, segment end)")
        ax.set_ylabel(f"first-frame consistency x100 ({backbone})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("consistency to the first frame over time", fontsize=10)
    return _save(fig, path)


def revisit_vs_lag(df: pd.DataFrame, path: str | Path) -> Path:
    """Memory against lag (seconds, log scale): retention (1 = reproduces, 0 = chance) with the level that
    decides the effective context, and revisit PSNR beside the chance PSNR (dashed) it is read against."""
    from cf.metrics.revisit import RETENTION_LEVEL

    ret = tables.revisit_bins(df, "retention")
    if not ret:
        raise CfError("revisit_vs_lag: no revisit_retention_lag_<lo>-<hi>s columns in the rows")
    fig, axes = _figure(1, 2, (12, 4.0))

    def centre(lo, hi):
        return np.sqrt(max(lo, 0.25) * hi) if np.isfinite(hi) else 1.25 * lo

    for i, (_, row) in enumerate(df.iterrows()):
        colour = f"C{i % 10}"
        label = tables.row_label(row)
        x = [centre(lo, hi) for lo, hi, _ in ret]
        axes[0][0].plot(x, [float(row[c]) for _, _, c in ret], marker="o", color=colour, label=label)
        for what, style in (("psnr", "-"), ("chance_psnr", "--")):
            series = tables.revisit_bins(df, what)
            axes[0][1].plot([centre(lo, hi) for lo, hi, _ in series], [float(row[c]) for _, _, c in series],
                            style, marker=".", color=colour, label=label if what == "psnr" else None)
    axes[0][0].axhline(RETENTION_LEVEL, color="grey", lw=0.8, ls=":")
    axes[0][0].set_ylabel("retention (1 = remembers, 0 = chance)")
    axes[0][1].set_ylabel("revisit PSNR (dB); dashed: chance")
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_xlabel("revisit lag (s)")
        ax.grid(alpha=0.3, which="both")
    axes[0][1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("memory: the camera returns to a place it showed `lag` seconds earlier", fontsize=10)
    return _save(fig, path)


def strip_times(seconds: float, every: float) -> list[float]:
    """0, every, 2 * every, ... up to `seconds` (the last one included)."""
    if not every > 0:
        raise CfError(f"strip interval {every} must be positive (bench.segment_s)")
    n = int(np.floor(seconds / every + 1e-9))
    return [k * every for k in range(n + 1)]


def frame_strip(
    path: str | Path,
    rows: Sequence[tuple[str, np.ndarray]],
    times: Sequence[float],
    fps: float,
    title: str | None = None,
) -> Path:
    """A contact sheet: one row per (label, uint8 video [T, H, W, 3]), one column per time (seconds;
    a time past the end shows the last frame)."""
    from cf.video import contact_sheet

    picks = []
    for _, video in rows:
        idx = [min(int(round(t * fps)), len(video) - 1) for t in times]
        picks.append(np.asarray(video)[idx])
    return contact_sheet(
        path,
        picks,
        row_labels=[label for label, _ in rows],
        col_labels=[f"{t:g} s" for t in times],
        title=title,
    )
