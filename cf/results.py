"""Results tables from MLflow: pipeline runs -> pandas -> `results/<preset>/<ablation>.md` + `.csv`.

`cf tables` (and `make tables`) reads every finished pipeline run (stage tag `pipeline`) of the
store, keeps the latest per (preset, ablation, variant, method, memory, seed), averages seeds, and
renders one Markdown file per ablation in the paper's layouts with the renderers of
`cf.bench.tables`: Table 1 (first-frame consistency over time), the Table 2-style summary, revisit
PSNR by lag, and the teachers' continuation PSNR. The CSV beside it holds every column. Pipelines
run outside a grid (`make ablate MEMORY=...`) are grouped as `pipelines`.

A pipeline run carries its stages' final metrics as `<stage>/<name>` (see cf.pipeline), so the
benchmark's `bench/<column>` metrics map one to one onto the row contract of `cf.bench.tables`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from cf.config.load import ROOT
from cf.errors import CfError
from cf.utils import atomic_write_text

RESULTS = ROOT / "results"
TAGS = ("method", "memory", "preset", "ablation", "variant", "git_sha", "run_dir")
PARAMS = ("seed", "data.fps")
GROUP = ["preset", "ablation", "variant", "method", "memory"]
GENERATOR_STAGES = ("student", "cdmd1", "cdmd2")  # their eval.json: distilled vs untrained (student_stage)
UNGROUPED = "pipelines"  # the table name of pipelines run outside an ablation grid
# every run behind a table, one row per (configuration, seed): what the next `cf tables` merges with its store
SEEDS = ".seeds.csv"
# The teacher's continuation PSNR (dB) on held-out clips, by region (cf.evaluation.continuation).
TEACHER_PSNR = (
    ("psnr_long_all", "long, all"),
    ("psnr_long_mean_all", "long mean, all"),  # expected continuation (x0 at sigma 1)
    ("psnr_long_memory", "long, seen before"),
    ("psnr_short_memory", "short, seen before"),
    ("psnr_shift_last_all", "shift-last, all"),
)


def pipeline_runs(cfg: DictConfig, status: str | None = "FINISHED") -> pd.DataFrame:
    """One row per pipeline run of the experiment `cfg.tracking.experiment` (empty if none yet).

    Columns: run_id, start_time, status, the tags in TAGS, the params in PARAMS, and every metric
    under its stored name (`bench/subject_consistency`, `teacher_erft/psnr_long_all`, ...).
    """
    from cf import tracking

    empty = pd.DataFrame(columns=["run_id", "start_time", "status", *TAGS, *PARAMS])
    uri = tracking.tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").split("?")[0]).is_file():
        return empty  # a fresh clone: no store yet (and reading must not create one)
    client = tracking.client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return empty
    flt = "tags.stage = 'pipeline'" + (f" and attributes.status = '{status}'" if status else "")
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # mlflow.search_runs reads the global URI (and pages for us)
    try:
        found = mlflow.search_runs([exp.experiment_id], filter_string=flt, output_format="list")
    finally:
        mlflow.set_tracking_uri(before)
    rows = []
    for r in found:
        row = {"run_id": r.info.run_id, "start_time": r.info.start_time, "status": r.info.status}
        row.update({t: r.data.tags.get(t, "") for t in TAGS})
        row.update({p: r.data.params.get(p) for p in PARAMS})
        row.update(r.data.metrics)
        rows.append(row)
    df = pd.DataFrame(rows) if rows else empty
    for p in PARAMS:
        df[p] = pd.to_numeric(df[p], errors="coerce")
    return df


def committed_seeds(results_dir: str | Path = RESULTS) -> pd.DataFrame:
    """The per-seed pipeline rows that earlier `cf tables` runs committed (`<preset>/<ablation>.seeds.csv`),
    one row per run as `pipeline_runs` gives it; empty when there are none."""
    files = sorted(Path(results_dir).glob(f"*/*{SEEDS}"))
    frames = [pd.read_csv(f, keep_default_na=False, na_values=[""]) for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    for c in TAGS:
        if c in df:
            df[c] = df[c].fillna("").astype(str)
    return df


def with_committed_seeds(df: pd.DataFrame, results_dir: str | Path = RESULTS) -> pd.DataFrame:
    """The store's runs plus the committed per-seed rows of runs it does not hold (another machine's, an
    earlier session's): a grid of many seeds accumulates across machines. Where both hold a run of the
    same configuration and seed, `latest` keeps the newer."""
    old = committed_seeds(results_dir)
    if old.empty:
        return df
    if not df.empty:
        old = old[~old["run_id"].isin(set(df["run_id"]))]
    return pd.concat([df, old], ignore_index=True) if not df.empty else old


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """The newest run per (preset, ablation, variant, method, memory, seed, run_dir)."""
    if df.empty:
        return df
    keys = [*GROUP, "seed", "run_dir"]
    return df.sort_values("start_time").groupby(keys, dropna=False, sort=False).tail(1)


def seed_means(df: pd.DataFrame, intervals: bool = True) -> pd.DataFrame:
    """Numeric columns averaged over seeds per (preset, ablation, variant, method, memory), plus `seeds`;
    with `intervals`, each column's 95% t interval over the seeds as `<col>_ci_lo` / `<col>_ci_hi`
    (`cf.seedstats`; NaN with one seed)."""
    from cf import seedstats

    if df.empty:
        return df
    df = df.assign(**{c: df[c].fillna("").astype(str) for c in ("ablation", "variant") if c in df})
    skip = (*GROUP, "seed", "start_time")
    num = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    out = seedstats.aggregate(df, GROUP, num)
    return out if intervals else out[[*GROUP, *num, "seeds"]]


@functools.lru_cache(maxsize=64)
def _read_through(preset: str, method: str, memory: str) -> str:
    """The policy a method's generator is benchmarked through: its `bench.memory.policy` when it sets one
    for this trained policy (infinite_rope: trained sliding, read through a sink), else `memory`."""
    from cf.config import load_config

    try:
        cfg = load_config(preset, method)
    except (CfError, ValueError):  # a method or preset this checkout does not have: label as stored
        return memory
    inference = cfg.bench.memory.get("policy")
    return inference if inference and cfg.memory.policy == memory else memory


def bench_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the column contract of `cf.bench.tables`: `bench/<col>` -> `<col>`, identity columns kept.

    A variant that is neither the method nor the memory policy is shown beside the policy
    (`context_forcing (slowfast; erft=off)`), since the renderers label rows by method and memory.
    """
    scores = df[[c for c in df.columns if c.startswith("bench/")]]
    scores = scores.rename(columns=lambda c: c.removeprefix("bench/"))
    kept = df[[c for c in df.columns if not c.startswith("bench/") and c not in scores.columns]]
    out = pd.concat([kept, scores], axis=1)  # one concat: a column-wise insert per score fragments the frame
    out["memory"] = [
        _read_through(str(p), str(m), str(k)) for p, m, k in zip(out["preset"], out["method"], out["memory"])
    ]
    visible = (out["variant"] == out["memory"]) | (out["variant"] == out["method"]) | (out["variant"] == "")
    out["memory"] = out["memory"].where(
        visible, out["memory"] + "; " + out["ablation"] + "=" + out["variant"]
    )
    return out


def _teacher_table(df: pd.DataFrame) -> str | None:
    """The method's teacher (ERFT when it ran) on held-out continuation, per row; None if never measured."""
    from cf.bench.tables import fmt, markdown, row_label

    out: dict[str, list[str]] = {"model": [], "teacher": [], "steps": []}
    out.update({head: [] for _, head in TEACHER_PSNR})
    for _, r in df.iterrows():
        stage = "teacher_erft" if pd.notna(r.get(f"teacher_erft/{TEACHER_PSNR[0][0]}")) else "teacher"
        out["model"].append(row_label(r))
        out["teacher"].append(stage)
        # the teacher's own optimizer steps (before ERFT's); a seed mean when seeds differ
        cut = r.get("teacher/cut_short")
        out["steps"].append(fmt(r.get("teacher/steps"), ",.0f") + ("†" if pd.notna(cut) and cut > 0 else ""))
        for key, head in TEACHER_PSNR:
            out[head].append(fmt(r.get(f"{stage}/{key}"), ".1f"))
    if all(c == "-" for _, head in TEACHER_PSNR for c in out[head]):
        return None
    return markdown(pd.DataFrame(out))


def _stage_table(df: pd.DataFrame, metric: str, untrained: str, spec: str, scale: float) -> str | None:
    """One generator metric per stage (student, cdmd1, cdmd2) beside the untrained student's (and, where
    measured, the undistilled one's: the teacher's weights in the student's sampler)."""
    from cf.bench.tables import fmt, markdown, row_label

    cols = [s for s in GENERATOR_STAGES if f"{s}/{metric}" in df.columns]
    if not cols:
        return None
    out = {"model": [row_label(r) for _, r in df.iterrows()]}
    out["untrained"] = [fmt(r.get(f"student/{untrained}"), spec, scale) for _, r in df.iterrows()]
    start = untrained.replace("untrained", "undistilled", 1)  # the teacher's weights in the student's sampler
    if f"student/{start}" in df.columns:
        out["undistilled"] = [fmt(r.get(f"student/{start}"), spec, scale) for _, r in df.iterrows()]
    for s in cols:
        out[s] = [fmt(r.get(f"{s}/{metric}"), spec, scale) for _, r in df.iterrows()]
    return markdown(pd.DataFrame(out))


def _realism_table(df: pd.DataFrame) -> str | None:
    """`_stage_table` of the realism FD, on whichever backbone the stage evaluations used."""
    import re

    found = [m for c in df.columns if (m := re.match(r"^student/distilled_realism_fd_([a-z0-9]+)$", c))]
    if not found:
        return None
    bb = found[0][1]
    return _stage_table(df, f"distilled_realism_fd_{bb}", f"untrained_realism_fd_{bb}", ".1f", 1.0)


def _time_table(df: pd.DataFrame) -> str | None:
    """Minutes each stage took to train (cached stages: when they were trained)."""
    from cf.bench.tables import fmt, markdown, row_label

    stages = [
        c.removeprefix("pipeline/").removesuffix("_seconds")
        for c in df.columns
        if c.startswith("pipeline/") and c.endswith("_seconds")
    ]
    if not stages:
        return None
    out = {"model": [row_label(r) for _, r in df.iterrows()]}
    for s in stages:
        out[s] = [fmt(r.get(f"pipeline/{s}_seconds"), ".1f", 1 / 60) for _, r in df.iterrows()]
    return markdown(pd.DataFrame(out))


def render(name: str, rows: pd.DataFrame, description: str = "") -> str:
    """One ablation's Markdown: the paper's tables for its rows (sections without data are skipped)."""
    from cf import teacher_curve
    from cf.bench import tables

    preset = ", ".join(sorted(set(rows["preset"])))
    parts = [
        f"# {name}" + (f": {description}" if description else ""),
        "",
        f"Preset `{preset}`; {len(rows)} configuration(s), seeds averaged (`seeds` column in the CSV). "
        "Generated by `make tables` from the MLflow pipeline runs.",
        "",
    ]
    sections = (
        ("Consistency to the first frame over time (x100; Table 1 layout)", lambda: tables.table1(rows)),
        ("Summary (Table 2 layout)", lambda: tables.table2(rows)),
        ("Revisit retention by lag (1 = reproduces what it showed, 0 = chance)",
         lambda: tables.revisit_table(rows, "retention")),
        ("Share of the compared pixels the clean context frames showed, by lag (what an attention sink "
         "could serve; 0 = out of its reach)", lambda: tables.revisit_table(rows, "sink_share")),
        ("Revisit PSNR (dB) by lag", lambda: tables.revisit_table(rows, "psnr")),
        ("Teacher continuation PSNR (dB) on held-out clips", lambda: _teacher_table(rows)),
        ("Teacher learning curve: teacher optimizer steps reached (columns), per teacher length",
         lambda: teacher_curve.table(rows)),
        (
            "Generator stages vs the untrained student: revisit PSNR (dB), held-out worlds",
            lambda: _stage_table(rows, "distilled_revisit_psnr", "untrained_revisit_psnr", ".1f", 1.0),
        ),
        (
            "Generator stages vs the untrained student: first-frame consistency (x100)",
            lambda: _stage_table(
                rows, "distilled_first_frame_consistency", "untrained_first_frame_consistency", ".2f", 100.0
            ),
        ),
        (
            "Generator stages vs the untrained student: revisit retention (1 = reproduces what it showed, "
            "0 = chance), held-out worlds",
            lambda: _stage_table(
                rows, "distilled_revisit_retention", "untrained_revisit_retention", ".2f", 1.0
            ),
        ),
        (
            "Generator stages: realism, Fréchet distance to real clips of the world (lower is better; "
            "the world itself scores its own sampling spread)",
            lambda: _realism_table(rows),
        ),
        ("Training time per stage (minutes)", lambda: _time_table(rows)),
    )
    for title, make in sections:
        try:
            body = make()
        except CfError:  # e.g. no revisit lags measured at this preset
            body = None
        if body:
            parts += [f"## {title}", "", body]
    return "\n".join(parts)


def _variant_order(name: str) -> list[str]:
    from cf.ablation import ABLATIONS, load_ablation

    path = ABLATIONS / f"{name}.yaml"
    return list(load_ablation(path).variants) if path.is_file() else []


def _description(name: str) -> str:
    from cf.ablation import ABLATIONS, load_ablation

    path = ABLATIONS / f"{name}.yaml"
    return load_ablation(path).description if path.is_file() else ""


def write_tables(
    cfg: DictConfig,
    ablations: Iterable[str] | None = None,
    out: str | Path = RESULTS,
    runs: pd.DataFrame | None = None,
) -> list[Path]:
    """Write `<out>/<preset>/<ablation>.md` and `.csv` for each ablation with finished runs."""
    from cf import claims, seedstats
    from cf.seedtables import headline, log_seed_tables, seed_tables

    stored = runs is None
    df = with_committed_seeds(pipeline_runs(cfg), out) if stored else runs
    if df.empty:
        return []
    per_seed = latest(df).copy()  # one block again after the column-wise merges (pandas warns otherwise)
    per_seed = per_seed.assign(**{c: per_seed[c].fillna("").astype(str) for c in ("ablation", "variant")})
    stats = seed_means(per_seed)  # seed means, their intervals, `seeds`
    df = stats[[c for c in stats.columns if not c.endswith((seedstats.LO, seedstats.HI))]]
    wanted = None if ablations is None else set(ablations)
    written: list[Path] = []
    verdict_presets: set[str] = set()  # presets whose claims grids were rewritten
    for (preset, ablation), group in df.groupby(["preset", "ablation"], sort=True):
        name = ablation or UNGROUPED
        if wanted is not None and ablation not in wanted and name not in wanted:
            continue
        variants = _variant_order(ablation) if ablation else []
        order = {v: i for i, v in enumerate(variants)}
        group = group.assign(_o=group["variant"].map(order).fillna(len(order)))
        group = group.sort_values(["_o", "method", "memory"]).drop(columns="_o")
        rows = bench_rows(group)
        seeds = per_seed[(per_seed["preset"] == preset) & (per_seed["ablation"] == ablation)]
        seeds = seeds.assign(_o=seeds["variant"].map(order).fillna(len(order))).sort_values(["_o", "seed"])
        seed_md, pairs = seed_tables(bench_rows(seeds.drop(columns="_o")), variants[0] if variants else None)
        md = render(name, rows, _description(ablation)) + ("\n" + seed_md if seed_md else "")
        base = Path(out) / str(preset) / name
        files = [atomic_write_text(base.with_suffix(".md"), md)]
        files.append(atomic_write_text(base.with_suffix(".csv"), stats.loc[group.index].to_csv(index=False)))
        if not pairs.empty:
            files.append(atomic_write_text(base.with_suffix(".paired.csv"), pairs.to_csv(index=False)))
        files.append(atomic_write_text(base.with_suffix(SEEDS), seeds.drop(columns="_o").to_csv(index=False)))
        if stored and seed_md and cfg.tracking.enabled:
            heads = [c for c, *_ in headline(bench_rows(seeds.drop(columns="_o")))]
            log_seed_tables(cfg, str(preset), name, stats.loc[group.index], pairs, heads, files)
        written += files
        if ablation in claims.GRIDS:
            verdict_presets.add(str(preset))
    for preset in sorted(verdict_presets):  # from the files just written, so both schemes are in
        base = Path(out) / preset
        grids = {g: pd.read_csv(base / f"{g}{SEEDS}", keep_default_na=False, na_values=[""])
                 for g in claims.GRIDS if (base / f"{g}{SEEDS}").is_file()}
        written += claims.write_verdicts(base, grids)
    return written
