"""The seed sections of `cf tables`: each configuration's headline numbers as a mean with its 95% interval
over training seeds, the paired differences of every variant against the grid's first (its reference),
and the same numbers in MLflow (one run per table, tag ``stage=tables``). Statistics: `cf.seedstats`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig


def headline(rows: pd.DataFrame) -> list[tuple[str, str, str, float]]:
    """(column, header, format, scale) of the numbers the seed tables show, among the bench rows'
    columns: effective context, retention, consistency (VBench-Long and its long-range term), first-frame
    consistency at the last segment, dynamic degree, moving fraction and flow magnitude, realism."""
    from cf.bench import tables
    from cf.metrics.columns import REALISM

    out = [("effective_context_s", "Context (s)", ".1f", 1.0), ("revisit_retention", "Retention", ".2f", 1.0)]
    for term in ("clips", "long_range"):
        out += [(col, head, ".1f", 100.0) for col, head in tables.consistency_heads(rows, term)]
    for backbone, series in tables.first_frame_columns(rows).items():
        out.append((series[-1][1], f"{backbone} @{series[-1][0]:g}s", ".1f", 100.0))
    out += [("dynamic_degree", "Dynamic", ".1f", 100.0), ("moving_fraction", "Moving", ".1f", 100.0)]
    out.append(("flow_magnitude", "Flow (px)", ".2f", 1.0))  # motion where the two above saturate
    out += [(c, f"FD ({m['backbone']})", ".1f", 1.0) for c in rows.columns if (m := REALISM.match(str(c)))]
    return [h for h in out if h[0] in rows.columns and rows[h[0]].notna().any()]


CUT = "†"  # a seed one of whose stages a wall-clock cap stopped before its planned steps


def cut_short(row) -> bool:
    """Whether any training stage of this pipeline row stopped before its planned steps (its
    `<stage>/cut_short` metric, logged by every stage run)."""
    return any(str(c).endswith("/cut_short") and row[c] == 1 for c in row.index)


def _key(row) -> str:
    """A row's name in the seed tables and MLflow keys: its variant, or method-memory outside a grid."""
    return str(row["variant"]) or f"{row['method']}-{row['memory']}"


def seed_tables(per_seed: pd.DataFrame, reference: str | None) -> tuple[str | None, pd.DataFrame]:
    """Markdown of the seed intervals (and, with a `reference` variant, the paired differences against
    it) for one ablation's per-seed bench rows, and the paired differences as a DataFrame."""
    from cf import seedstats
    from cf.bench.tables import fmt, markdown, row_label

    heads = headline(per_seed)
    if not heads or per_seed["seed"].nunique() < 2:
        return None, pd.DataFrame()
    names = list(dict.fromkeys(_key(r) for _, r in per_seed.iterrows()))
    keyed = per_seed.assign(_key=[_key(r) for _, r in per_seed.iterrows()])
    out: dict[str, list[str]] = {"model": [], "seeds": []}
    for name in names:
        g = keyed[keyed["_key"] == name]
        out["model"].append(row_label(g.iloc[0]))
        out["seeds"].append(", ".join(f"{int(r['seed'])}{CUT if cut_short(r) else ''}"
                                      for _, r in g.sort_values("seed").iterrows()))
        for col, head, spec, scale in heads:
            cell = seedstats.interval(g[col]).text(spec, scale)
            bound = g.get("effective_context_is_lower_bound")
            if col == "effective_context_s" and bound is not None and (bound == 1).all() and cell != "-":
                cell = "≥" + cell
            out.setdefault(head, []).append(cell)
    parts = [
        "## Seeds: mean [95% interval] (Student t over training seeds)",
        "",
        "Each seed trains every stage again (teachers included) and is benchmarked on the same worlds. "
        "Context: ≥ when every seed's was a lower bound (every lag bin held). "
        f"{CUT}: a wall-clock cap stopped one of that seed's stages before its planned steps (cut short).",
        "",
        markdown(pd.DataFrame(out)),
    ]
    pairs = pd.DataFrame()
    if reference in names and len(names) > 1:
        pairs = seedstats.paired(keyed, "_key", reference, [c for c, *_ in heads])
        pairs = pairs.rename(columns={"_key": "variant"})
        table: dict[str, list[str]] = {"variant": [], "pairs": []}
        for name in names:
            if name == reference:
                continue
            p = pairs[pairs["variant"] == name].set_index("column")
            table["variant"].append(name)
            table["pairs"].append(str(int(p["pairs"].max())) if len(p) else "0")
            for col, head, spec, scale in heads:
                if col in p.index:
                    r = p.loc[col]
                    iv = seedstats.Interval(*(float(r[k]) for k in ("delta", "lo", "hi")), int(r["pairs"]))
                else:
                    iv = seedstats.Interval(float("nan"), float("nan"), float("nan"), 0)
                mark = "" if not iv.excludes(0.0) else " *"
                table.setdefault(head, []).append(iv.text("+" + spec, scale) + mark if iv.n else fmt(None))
        parts += [
            f"## Paired differences vs {reference} (variant - {reference}, same seed): mean [95% interval]",
            "",
            "`*`: the interval excludes 0 (the seeds support a difference).",
            "",
            markdown(pd.DataFrame(table)),
        ]
    return "\n".join(parts), pairs


def log_seed_tables(cfg: DictConfig, preset: str, name: str, stats: pd.DataFrame, pairs: pd.DataFrame,
                     heads: list[str], files: list[Path]) -> None:
    """One MLflow run per (preset, table), tag stage=tables, reused on every `cf tables`: the headline
    columns' seed means and intervals (`seeds/<row>/<column>[_ci_lo|_ci_hi]`), the paired differences
    (`paired/<row>/<column>[_ci_lo|_ci_hi]`) and the table files as artifacts."""
    import math
    import time

    from mlflow.entities import Metric

    from cf import seedstats, tracking

    client = tracking.client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return
    tags = {"stage": "tables", "ablation": name, "preset": preset}
    flt = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    found = client.search_runs([exp.experiment_id], flt)
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(exp.experiment_id, run_name=f"{name}-{preset}-seeds", tags=tags)
        run_id = run.info.run_id
    now, metrics = int(time.time() * 1000), []

    def put(key: str, value) -> None:
        if value is not None and math.isfinite(float(value)):
            metrics.append(Metric(key, float(value), now, 0))

    for _, r in stats.iterrows():
        row = str(r["variant"]) or f"{r['method']}-{r['memory']}"
        put(f"seeds/{row}/n", r["seeds"])
        for c in heads:
            for suffix in ("", seedstats.LO, seedstats.HI):
                put(f"seeds/{row}/{c}{suffix}", r.get(f"bench/{c}{suffix}"))
    for _, p in pairs.iterrows():
        for key, suffix in (("delta", ""), ("lo", seedstats.LO), ("hi", seedstats.HI)):
            put(f"paired/{p['variant']}/{p['column']}{suffix}", p[key])
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i:i + 900])
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id)
