"""The names of the scores: one function turns a `VideoScorer` result into the flat columns that tables,
CSVs and MLflow (``<stage>/<column>``) use, so a stage's evaluation and the benchmark cannot disagree on
what a column means.

Columns (floats; NaN = not measured). Consistencies are cosines in [0, 1] (tables show them x100):
  ``consistency_<bb>``                 VBench-Long consistency (mean of 2 s clip scores) when one
                                       backbone <bb> computes both subject and background
  ``subject_consistency_<bb>``, ``background_consistency_<bb>``   the same, per role, when VBench's two
                                       backbones differ (DINO for subjects, CLIP for the background)
  ``<any of those>_long``              VBench-Long's cross-clip (long-range) term
  ``<any of those>_whole``             VBench's formula over the whole video at once
  ``first_frame_<bb>_at_<T>s``         first-frame consistency of the segment ending at T s (Table 1)
  ``drift_first_to_last``, ``drift_slope_per_s``   change of the first-frame curve (main backbone)
  ``motion_smoothness``, ``dynamic_degree``   VBench-style motion (dynamic degree with a 1.5 px floor on
                                       its threshold: `cf.metrics.motion`); ``moving_fraction`` (share of
                                       frame pairs that move), ``flow_magnitude`` (px), ``flow_magnitude_rel``
  ``total``                            mean of the consistency columns (VBench-Long), smoothness and
                                       dynamic degree: cf's stand-in for VBench's 16-dimension Total
  ``realism_fd_<bb>``                  Fréchet distance of the frames' <bb> features to real clips
  ``revisit_psnr``, ``revisit_chance_psnr``, ``revisit_retention``, ``revisit_lpips``  over all pairs
  ``revisit_sink_share``               share of the compared pixels whose place the clean context frames
                                       showed (what an attention sink could serve; NaN without a camera)
  ``revisit_<what>_lag_<lo>-<hi>s``    the same per lag bin (what: psnr, chance_psnr, retention, lpips,
                                       sink_share)
  ``effective_context_s``              longest lag up to which retention holds;
                                       ``effective_context_is_lower_bound`` 1 when it held at every lag
"""

from __future__ import annotations

import math
import re

FIRST_FRAME = re.compile(r"^first_frame_(?P<backbone>[a-z0-9]+)_at_(?P<t>\d+(?:\.\d+)?)s$")
CONSISTENCY = re.compile(
    r"^(?P<role>subject_|background_)?consistency_(?P<backbone>[a-z0-9]+)(?P<term>_long|_whole)?$")
REVISIT_LAG = re.compile(
    r"^revisit_(?P<what>psnr|chance_psnr|retention|lpips|sink_share)_lag_(?P<lo>\d+(?:\.\d+)?)-(?P<hi>\d+(?:\.\d+)?|inf)s$")
REALISM = re.compile(r"^realism_fd_(?P<backbone>[a-z0-9]+)$")
REVISIT_MEASURES = ("retention", "psnr", "chance_psnr", "lpips", "sink_share")
TERMS = {"clips": "", "long_range": "_long", "whole": "_whole"}


def first_frame_column(backbone: str, t: float) -> str:
    """First-frame consistency of the segment ending at `t` seconds."""
    return f"first_frame_{backbone}_at_{t:g}s"


def consistency_column(role: str, backbone: str, term: str = "clips") -> str:
    """role: "both" (one backbone for subject and background), "subject" or "background"; term: clips
    (VBench-Long, the headline), long_range or whole."""
    prefix = "" if role == "both" else f"{role}_"
    return f"{prefix}consistency_{backbone}{TERMS[term]}"


def revisit_column(what: str, lo_s: float, hi_s: float) -> str:
    """A revisit measure of the lag bin [lo_s, hi_s) seconds."""
    return f"revisit_{what}_lag_{lo_s:g}-{hi_s:g}s"


def realism_column(backbone: str) -> str:
    return f"realism_fd_{backbone}"


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def score_columns(s: dict, extra_first_frame: dict | None = None) -> dict[str, float]:
    """A `VideoScorer` result (one video or the aggregate) -> the flat columns above. `extra_first_frame`:
    {backbone: first-frame curve rows} of more backbones (Table 1)."""
    cols: dict[str, float] = {}
    headline = []
    for c in s["consistency"]:
        for term in TERMS:
            cols[consistency_column(c["role"], c["backbone"], term)] = _nan(c[term])
        headline.append(c["clips"])
    quality = [*headline, s["motion_smoothness"], s["dynamic_degree"]]
    cols.update({
        "motion_smoothness": _nan(s["motion_smoothness"]),
        "dynamic_degree": _nan(s["dynamic_degree"]),
        "moving_fraction": _nan(s["moving_fraction"]),
        "flow_magnitude": _nan(s["flow_magnitude"]),
        "flow_magnitude_rel": _nan(s["flow_magnitude_rel"]),
        "total": math.nan if None in quality else sum(quality) / len(quality),
        "drift_first_to_last": _nan(s["drift"]["first_to_last"]),
        "drift_slope_per_s": _nan(s["drift"]["slope_per_s"]),
    })
    curves = {s["backbone"]: s["first_frame_consistency"], **(extra_first_frame or {})}
    for name, rows in curves.items():
        for seg in rows:
            cols[first_frame_column(name, round(seg["end_s"], 3))] = _nan(seg["value"])
    if s.get("realism"):
        cols[realism_column(s["realism"]["backbone"])] = _nan(s["realism"]["fd"])
    rv = s["revisit"]
    if rv:
        bound = s["effective_context_is_lower_bound"]
        cols.update({
            "effective_context_s": _nan(s["effective_context_s"]),
            "effective_context_is_lower_bound": math.nan if bound is None else float(bound),
            **{f"revisit_{what}": _nan(rv[what]) for what in REVISIT_MEASURES},
        })
        for b in rv["by_lag"]:
            for what in REVISIT_MEASURES:
                cols[revisit_column(what, b["lo_s"], b["hi_s"])] = _nan(b[what])
    return cols


def consistency_columns(columns) -> list[tuple[str, str, str, str]]:
    """[(column, role, backbone, term)] of the consistency columns among `columns`, headline terms
    first, each role in the order subject+background, subject, background."""
    order = {"": 0, "subject_": 1, "background_": 2}
    found = [(str(c), m) for c in columns if (m := CONSISTENCY.match(str(c)))]
    found.sort(key=lambda x: (x[1]["term"] or "", order[x[1]["role"] or ""], x[0]))
    return [(c, (m["role"] or "both_")[:-1], m["backbone"],
             {"": "clips", "_long": "long_range", "_whole": "whole"}[m["term"] or ""]) for c, m in found]


def revisit_bins(columns, what: str = "retention") -> list[tuple[float, float, str]]:
    """[(lo_s, hi_s, column)] sorted by lag for the revisit measure `what`."""
    found = [(float(m["lo"]), float(m["hi"]), str(c)) for c in columns
             if (m := REVISIT_LAG.match(str(c))) and m["what"] == what]
    return sorted(found)
