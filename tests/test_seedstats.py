"""Seed intervals and paired differences (cf.seedstats), and the seed sections of `cf tables`."""

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cf import results, seedstats, seedtables
from cf.config import load_config

T2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables)


def test_t_interval_by_hand():
    iv = seedstats.interval([1.0, 2.0, 3.0])
    half = T2 * 1.0 / math.sqrt(3)  # sd of 1, 2, 3 is 1
    assert (iv.mean, iv.n) == (2.0, 3)
    assert (iv.lo, iv.hi) == pytest.approx((2.0 - half, 2.0 + half))
    assert iv.text(".1f") == f"2.0 [{2 - half:.1f}, {2 + half:.1f}]"
    one = seedstats.interval([5.0, float("nan"), None])  # one finite value: a mean, no interval
    assert one.n == 1 and one.text(".1f") == "5.0" and not one.excludes(0.0)
    assert seedstats.interval([]).text() == "-"


def test_pairing_sees_a_difference_that_independent_intervals_hide():
    ref, var = [1.0, 2.0, 3.0], [1.2, 2.2, 3.25]
    a, b = seedstats.interval(ref), seedstats.interval(var)
    assert a.hi > b.lo  # the two intervals overlap: unpaired, one cannot tell
    df = pd.DataFrame({"v": ["ref"] * 3 + ["var"] * 3, "seed": [0, 1, 2] * 2, "x": ref + var})
    p = seedstats.paired(df, "v", "ref", ["x"]).iloc[0]
    d = [0.2, 0.2, 0.25]
    half = T2 * math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2) / math.sqrt(3)
    assert (p["pairs"], p["delta"]) == (3, pytest.approx(sum(d) / 3))
    assert (p["lo"], p["hi"]) == pytest.approx((sum(d) / 3 - half, sum(d) / 3 + half))
    iv = seedstats.Interval(p["delta"], p["lo"], p["hi"], 3)
    assert iv.excludes(0.0) and seedstats.verdict(iv) == "variant better"
    assert seedstats.verdict(iv, better="lower") == "reference better"


def test_pairs_are_matched_by_seed_not_by_order():
    df = pd.DataFrame({"v": ["ref", "ref", "var", "var", "var"], "seed": [0, 1, 1, 0, 7],
                       "x": [10.0, 20.0, 21.0, 11.0, 99.0]})
    p = seedstats.paired(df, "v", "ref", ["x"]).iloc[0]
    assert (p["pairs"], p["delta"], p["lo"], p["hi"]) == (2, 1.0, 1.0, 1.0)  # seed 7 has no partner


def _row(variant, method, memory, seed, ctx, dyn, start):
    return {"run_id": f"r{start}", "start_time": start, "status": "FINISHED", "method": method,
            "memory": memory, "preset": "tiny", "ablation": "claims", "variant": variant, "git_sha": "abc",
            "run_dir": f"tiny/{variant}-seed{seed}", "seed": seed, "data.fps": 8.0,
            "bench/effective_context_s": ctx, "bench/effective_context_is_lower_bound": 0.0,
            "bench/dynamic_degree": dyn, "bench/first_frame_pixels_at_60s": 0.5,
            "bench/flow_magnitude": 4 * dyn}


def test_cf_tables_shows_seed_intervals_and_paired_differences(tmp_path):
    cfg = load_config("smoke")
    df = pd.DataFrame(
        [_row("context_forcing", "context_forcing", "slowfast", s, c, d, s) for s, c, d in
         [(0, 10.0, 0.5), (1, 12.0, 0.6), (2, 14.0, 0.4)]]
        + [_row("longlive", "longlive", "sink", s, c, d, 10 + s) for s, c, d in
           [(0, 1.0, 0.52), (1, 2.0, 0.58), (2, 4.0, 0.45)]]
    )
    # a wall-clock cap stopped longlive seed 1's teacher before its planned steps: its seed is marked
    df["teacher/cut_short"] = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    written = results.write_tables(cfg, out=tmp_path, runs=df)
    assert sorted(p.name for p in written) == ["claims.csv", "claims.md", "claims.paired.csv",
                                               "claims.seeds.csv", "claims_verdicts.csv",
                                               "claims_verdicts.md"]
    # two of the seven cells: no claim can be decided yet, and the verdicts file says so
    verdicts = (tmp_path / "tiny" / "claims_verdicts.md").read_text()
    assert "not decided (fewer than 2 seeds in some cell)" in verdicts
    md = (tmp_path / "tiny" / "claims.md").read_text()
    lines = md.splitlines()
    seeds = lines[lines.index("## Seeds: mean [95% interval] (Student t over training seeds)") + 4:][:4]
    head = [c.strip() for c in seeds[0].split("|")[1:-1]]
    assert head[:3] == ["model", "seeds", "Context (s)"] and "Dynamic" in head
    cf_row = [c.strip() for c in seeds[2].split("|")[1:-1]]
    ctx = seedstats.interval([10.0, 12.0, 14.0])
    assert cf_row[:3] == ["context_forcing (slowfast)", "0, 1, 2", ctx.text(".1f")]
    ll_row = [c.strip() for c in seeds[3].split("|")[1:-1]]
    assert ll_row[:2] == ["longlive (sink)", "0, 1†, 2"] and "†: a wall-clock cap stopped" in md
    paired = [[c.strip() for c in ln.split("|")[1:-1]] for ln in lines if ln.startswith("| longlive ")]
    cells = [c for c in paired if c[0] == "longlive"][0]  # the paired row (others are 'longlive (sink)')
    diff = seedstats.interval([1.0 - 10.0, 2.0 - 12.0, 4.0 - 14.0])
    assert cells[:3] == ["longlive", "3", diff.text("+.1f") + " *"]  # excludes 0: supported
    dyn = seedstats.interval([0.02, -0.02, 0.05])  # within noise: no star
    assert cells[head.index("Dynamic")] == dyn.text("+.1f", 100.0)  # same column order as above
    assert cells[head.index("Flow (px)")] == seedstats.interval([0.08, -0.08, 0.2]).text("+.2f")
    csv = pd.read_csv(tmp_path / "tiny" / "claims.csv")
    lo = csv.set_index("variant").loc["context_forcing", "bench/effective_context_s_ci_lo"]
    assert lo == pytest.approx(ctx.lo)
    pairs = pd.read_csv(tmp_path / "tiny" / "claims.paired.csv")
    got = pairs[pairs["column"] == "effective_context_s"].iloc[0]
    assert (got["delta"], got["lo"], got["hi"]) == pytest.approx((diff.mean, diff.lo, diff.hi))


def test_seed_tables_go_to_mlflow_and_a_rerun_reuses_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("smoke", overrides=[f"tracking.uri={uri}"])
    client = MlflowClient(uri)
    client.create_experiment(cfg.tracking.experiment)
    stats = pd.DataFrame([{"variant": "longlive", "method": "longlive", "memory": "sink", "seeds": 3,
                           "bench/effective_context_s": 2.0, "bench/effective_context_s_ci_lo": 1.0,
                           "bench/effective_context_s_ci_hi": 3.0}])
    pairs = pd.DataFrame([{"variant": "longlive", "column": "effective_context_s", "pairs": 3,
                           "delta": -9.0, "lo": -10.0, "hi": -8.0}])
    for _ in range(2):
        seedtables.log_seed_tables(cfg, "tiny", "claims", stats, pairs, ["effective_context_s"], [])
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'tables'")
    assert len(runs) == 1
    m = runs[0].data.metrics
    assert m["seeds/longlive/effective_context_s_ci_hi"] == 3.0 and m["seeds/longlive/n"] == 3
    paired = "paired/longlive/effective_context_s"
    assert (m[paired], m[paired + "_ci_lo"]) == (-9.0, -10.0)
