"""The teacher learning curve (`ablations/teacher_curve*.yaml`): the 16-frame and the 4-frame teachers at
several optimizer-step budgets, each distilled and benchmarked. Its variants are named `t<frames>_<k>k`
(t16_2k, t4_8k); this module reads them out of the pipeline rows as a long-form curve (what the claims
notebook plots) and as the table `cf tables` adds to the grid's Markdown."""

from __future__ import annotations

import re

import pandas as pd

from cf import seedstats

VARIANT = re.compile(r"^t(?P<frames>\d+)_(?P<k>\d+)k$")  # t16_2k, t4_8k, ...


def teacher_curve(rows: pd.DataFrame) -> pd.DataFrame:
    """Long form of the teacher learning curve: grid, context (the teacher's frames), steps (reached, else
    planned), measure (`psnr_seen`: the ERFT teacher's continuation PSNR on pixels seen before and out of
    the last 4 frames, only a teacher with more than 4 frames has them; `psnr_seen_short`: the same pixels
    continued from the last 4 frames only, so the gap is what the history is used for; `psnr_all`;
    `retention`: its student's benchmark retention), value, lo, hi (95% interval over seeds; NaN with one
    seed). Reads `bench/` scores with or without their prefix (`cf.results.bench_rows` strips it)."""
    measures = {"psnr_seen": "teacher_erft/psnr_long_memory",
                "psnr_seen_short": "teacher_erft/psnr_short_memory",
                "psnr_all": "teacher_erft/psnr_long_all", "retention": "bench/revisit_retention"}
    out = []
    for _, r in rows.iterrows():
        m = VARIANT.match(str(r.get("variant", "")))
        if not m or not str(r.get("ablation", "")).startswith("teacher_curve"):
            continue
        steps = r.get("teacher/steps", float("nan"))
        steps = 1000 * int(m["k"]) if pd.isna(steps) else float(steps)
        for name, col in measures.items():
            col = col if col in rows.columns else col.removeprefix("bench/")
            if col in rows.columns and pd.notna(r[col]):
                out.append({"preset": r["preset"], "grid": r["ablation"], "context": int(m["frames"]),
                            "steps": steps, "measure": name, "value": float(r[col]),
                            **seedstats.bounds(r, col)})
    cols = ["preset", "grid", "context", "steps", "measure", "value", "lo", "hi"]
    return pd.DataFrame(out, columns=cols).sort_values(["grid", "context", "steps"]) if out else \
        pd.DataFrame(columns=cols)


def table(df: pd.DataFrame) -> str | None:
    """The teacher learning curve (`ablations/teacher_curve*.yaml`): per teacher length and measure, one
    column per teacher step count reached; None outside those grids."""
    from cf.bench.tables import fmt, markdown

    tc = teacher_curve(df)
    if tc.empty:
        return None
    heads = {"psnr_seen": ("ERFT teacher, continuation PSNR on pixels seen before (dB)", ".1f"),
             "psnr_seen_short": ("the same pixels, continued from the last 4 frames only (dB)", ".1f"),
             "psnr_all": ("ERFT teacher, continuation PSNR, all pixels (dB)", ".1f"),
             "retention": ("student, revisit retention", ".2f")}
    steps = sorted(set(tc["steps"]))
    out: dict[str, list[str]] = {"teacher": [], "measure": []}
    out.update({f"{s:,.0f} steps": [] for s in steps})
    for (context, measure), g in tc.groupby(["context", "measure"], sort=False):
        head, spec = heads[measure]
        out["teacher"].append(f"{context}-frame")
        out["measure"].append(head)
        at = dict(zip(g["steps"], g["value"]))
        for s in steps:
            out[f"{s:,.0f} steps"].append(fmt(at.get(s), spec))
    return markdown(pd.DataFrame(out))
