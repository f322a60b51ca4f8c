"""Seeds as samples: a mean with its 95% interval per cell, and paired differences between variants.

A seed varies everything (its teachers, its student, its noise), so the seeds of one configuration are
independent draws of the whole pipeline, and the interval is Student's t over them:
``mean ± t(0.975, n-1) · sd / sqrt(n)`` (n = 3 seeds: t = 4.30, so the interval is wide on purpose).
A paired difference compares two variants seed by seed (the same seed trains both on the same data
stream and is benchmarked on the same worlds), which removes what the seed shares between them; its
interval is the t interval of the per-seed differences. With one seed there is no interval (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

LEVEL = 0.95
LO, HI = "_ci_lo", "_ci_hi"  # suffixes of a column's interval bounds in the tables' CSV


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    def excludes(self, value: float = 0.0) -> bool:
        """True when the interval lies entirely on one side of `value` (NaN bounds: never)."""
        return (self.lo > value or self.hi < value) if math.isfinite(self.lo) else False

    def text(self, spec: str = ".2f", scale: float = 1.0) -> str:
        """``mean [lo, hi]``, or ``mean`` alone without an interval; ``-`` without a mean."""
        if not math.isfinite(self.mean):
            return "-"
        m = format(self.mean * scale, spec)
        if not math.isfinite(self.lo):
            return m
        return f"{m} [{format(self.lo * scale, spec)}, {format(self.hi * scale, spec)}]"


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student t quantile for `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """Mean and t interval of the finite values (NaN / None dropped)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def bounds(row, col: str) -> dict[str, float]:
    """A seed-mean cell's 95% interval as {"lo", "hi"} from its `<col>_ci_lo` / `<col>_ci_hi` companions
    (NaN when the row has none: one seed, or an older table)."""
    return {"lo": float(row.get(col + LO, math.nan)), "hi": float(row.get(col + HI, math.nan))}


def aggregate(df: pd.DataFrame, group: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """One row per group: each column's mean, its interval as ``<col>_ci_lo`` / ``<col>_ci_hi``, and
    ``seeds`` (rows in the group). Columns missing from `df` are skipped."""
    cols = [c for c in columns if c in df.columns]
    rows = []
    for key, g in df.groupby(list(group), dropna=False, sort=False):
        row = dict(zip(group, key if isinstance(key, tuple) else (key,)))
        for c in cols:
            iv = interval(g[c])
            row.update({c: iv.mean, c + LO: iv.lo, c + HI: iv.hi})
        row["seeds"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def paired(
    df: pd.DataFrame, by: str, reference: str, columns: Sequence[str], key: str = "seed"
) -> pd.DataFrame:
    """Per variant of `by` other than `reference`, per column: the difference (variant - reference) over
    the seeds both have, with its t interval. Columns: `by`, column, pairs, delta, lo, hi."""
    ref = df[df[by] == reference].set_index(key)
    out = []
    for variant, g in df[df[by] != reference].groupby(by, sort=False):
        g = g.set_index(key)
        common = sorted(set(g.index) & set(ref.index))
        for c in columns:
            if c not in df.columns:
                continue
            iv = interval(float(g.at[s, c]) - float(ref.at[s, c]) for s in common)
            out.append({by: variant, "column": c, "pairs": iv.n, "delta": iv.mean, "lo": iv.lo, "hi": iv.hi})
    return pd.DataFrame(out, columns=[by, "column", "pairs", "delta", "lo", "hi"])


def verdict(diff: Interval, better: str = "higher") -> str:
    """What a paired difference (variant - reference) supports: 'reference better', 'variant better'
    or 'cannot tell' (the interval contains 0, or there is none)."""
    if not diff.excludes(0.0):
        return "cannot tell"
    ref_better = diff.hi < 0 if better == "higher" else diff.lo > 0
    return "reference better" if ref_better else "variant better"
