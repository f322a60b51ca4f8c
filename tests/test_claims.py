"""The claims' verdict rules (cf/claims.py) on per-seed rows whose right verdict is known by construction."""

import math

import pandas as pd
import pytest

from cf import claims, seedstats

VARIANTS = ("context_forcing", "longlive", "infinite_rope", "self_forcing", "cf_window", "cf_short",
            "cf_no_erft")
FF = "bench/first_frame_imagenet_at_60s"


def grid(seeds=(0, 1, 2), **cells) -> pd.DataFrame:
    """Per-seed rows: every variant gets CF's scores (context 20 s, retention 0.8, first-frame 0.4, FD 250)
    plus a seed-dependent wobble, then `cells[variant]` = {column: per-seed values} overrides them."""
    rows = []
    for v in VARIANTS:
        for i, s in enumerate(seeds):
            wob = 0.01 * (i - 1)
            r = {"variant": v, "seed": s, "data.fps": 8, claims.CONTEXT: 20.0 + wob,
                 claims.RETENTION: 0.8 + wob, FF: 0.4 + wob, "bench/realism_fd_imagenet": 250.0 + wob,
                 "bench/flow_magnitude": 1.0,
                 "bench/first_frame_imagenet_at_30s": 0.5}
            for col, values in cells.get(v, {}).items():
                r[col] = values[i]
            rows.append(r)
    return pd.DataFrame(rows)


def verdicts(df, scheme="world") -> dict[str, str]:
    v, _ = claims.decide(df, scheme)
    return dict(zip(v["claim"], v["verdict"]))


def test_equal_recipes_decide_nothing_and_fail_the_context_ratio():
    # every variant scores what CF scores: no comparison can tell them apart, and a 1x ratio is below 4x
    v = verdicts(grid())
    assert v == {"C1": "does not hold", "C2": "cannot tell", "C3": "cannot tell", "C4": "cannot tell"}


def test_c1_holds_only_when_the_ratio_interval_clears_the_goal_against_every_baseline():
    short = {claims.CONTEXT: [2.0, 2.5, 1.6]}  # 8-12.5x below CF's 20 s, every seed
    assert verdicts(grid(longlive=short, infinite_rope=short, self_forcing=short))["C1"] == "holds"
    # one baseline at 5-15x: the log ratio's interval reaches below 4x -> no longer decided
    wide = {claims.CONTEXT: [4.0, 1.33, 3.0]}
    assert verdicts(grid(longlive=short, infinite_rope=short, self_forcing=wide))["C1"] == "cannot tell"
    # one baseline whose context is CF's: fails against it, so the claim does not hold
    assert verdicts(grid(longlive=short, infinite_rope=short))["C1"] == "does not hold"


def test_a_context_of_zero_reads_as_the_first_bin_so_the_ratio_stays_finite():
    assert claims.resolution_s(8) == 0.375  # lags of 1-3 frames fall in the first bin [0, 0.5) s
    zero = {claims.CONTEXT: [0.0, 0.0, 0.0]}
    _, d = claims.decide(grid(longlive=zero, infinite_rope=zero, self_forcing=zero), "world")
    ratio = d[(d["claim"] == "C1") & (d["measure"] == "effective context ratio (x)")]
    expected = math.exp(sum(math.log((20.0 + 0.01 * (i - 1)) / 0.375) for i in range(3)) / 3)
    assert ratio["mean"].to_numpy() == pytest.approx([expected] * 3)


def test_memory_comparisons_follow_the_paired_intervals():
    worse = {claims.RETENTION: [0.6, 0.62, 0.58], claims.CONTEXT: [10.0, 10.5, 9.5]}
    better = {claims.RETENTION: [0.9, 0.92, 0.88]}
    v = verdicts(grid(cf_short=worse, cf_window=worse, cf_no_erft=better))
    assert v["C2"] == "holds" and v["C3"] == "does not hold"
    assert verdicts(grid(cf_short=worse))["C2"] == "partly"
    # worse retention, longer context: mixed, which is not "CF better"
    mixed = {claims.RETENTION: [0.6, 0.62, 0.58], claims.CONTEXT: [30.0, 31.0, 29.0]}
    down, up = seedstats.interval([-0.2, -0.18, -0.22]), seedstats.interval([10, 11, 9])
    assert claims.outcome([down, up]) == "mixed" and claims.outcome([down]) == "CF better"
    assert verdicts(grid(cf_no_erft=mixed))["C3"] == "cannot tell"


def test_pairs_are_taken_seed_by_seed_not_across_seeds():
    # CF and the variant share a large seed effect; the variant is 0.01 lower on every seed. Unpaired
    # intervals would overlap; paired, the difference is exactly -0.01 each time.
    shared = [0.2, 0.8, 0.5]
    df = grid(context_forcing={claims.RETENTION: shared},
              cf_no_erft={claims.RETENTION: [x - 0.01 for x in shared]})
    _, d = claims.decide(df, "world")
    row = d[(d["claim"] == "C3") & (d["measure"] == "revisit_retention")].iloc[0]
    assert row["mean"] == pytest.approx(-0.01) and row["hi"] == pytest.approx(-0.01)
    assert row["outcome"] == "CF better"


def test_c4_reads_the_last_segment_and_its_price_is_never_judged():
    ahead = {FF: [0.3, 0.31, 0.29], "bench/realism_fd_imagenet": [100.0, 101.0, 99.0]}
    v, d = claims.decide(grid(longlive=ahead, infinite_rope=ahead, self_forcing=ahead), "world")
    assert dict(zip(v["claim"], v["verdict"]))["C4"] == "holds"
    assert set(d[d["claim"] == "C4"]["measure"]) == {"first_frame_imagenet_at_60s"}
    price = d[d["claim"] == "C4 (price)"]
    assert len(price) == 6 and (price["outcome"] == "").all()  # FD and flow per baseline, no verdict


def test_one_seed_or_a_missing_cell_decides_nothing():
    assert set(verdicts(grid(seeds=(0,))).values()) == {"not decided (fewer than 2 seeds in some cell)"}
    df = grid()
    v = verdicts(df[df["variant"] != "cf_short"])
    assert v["C2"].startswith("not decided") and v["C3"] == "cannot tell"
    # a grid whose benchmark never measured the effective context: C1 is not run, the others still decided
    _, d = claims.decide(grid().drop(columns=[claims.CONTEXT]), "world")
    c1 = d[d["measure"] == "effective context ratio (x)"]
    assert len(c1) == 3 and (c1["outcome"] == "not run").all()


def test_write_verdicts_puts_both_schemes_side_by_side(tmp_path):
    (tmp_path / "tiny").mkdir()
    short = {claims.CONTEXT: [2.0, 2.5, 1.6]}
    grid(longlive=short, infinite_rope=short, self_forcing=short).to_csv(
        tmp_path / "tiny" / "claims_world.seeds.csv", index=False)
    grid().to_csv(tmp_path / "tiny" / "claims.seeds.csv", index=False)
    grids = {g: pd.read_csv(tmp_path / "tiny" / f"{g}.seeds.csv") for g in claims.GRIDS}
    md, csv = claims.write_verdicts(tmp_path / "tiny", grids)
    text = md.read_text()
    rows = {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| C")
            for cells in [[c.strip() for c in line.split("|")[1:-1]]]}
    assert "| claim | frame-relative | world |" in " ".join(text.split())
    assert rows["C1"] == ["does not hold", "holds"] and rows["C2"] == ["cannot tell", "cannot tell"]
    table = pd.read_csv(csv)
    assert set(table["scheme"]) == {"frame-relative", "world"}
    assert claims.write_verdicts(tmp_path / "small", {}) == []  # neither grid has rows
