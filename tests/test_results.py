"""`cf tables` and what the notebooks plot: MLflow pipeline runs -> rows -> results/<preset>/*.md + csv."""

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from cf import ablation, curves, pipeline, results, teacher_curve, tracking
from cf.cli import main
from cf.config import load_config


def row(variant, seed, start, score, ablation_="erft", memory="slowfast", preset="tiny", **metrics):
    return {
        "run_id": f"r{start}",
        "start_time": start,
        "status": "FINISHED",
        "method": "context_forcing",
        "memory": memory,
        "preset": preset,
        "ablation": ablation_,
        "variant": variant,
        "git_sha": "abc",
        "run_dir": f"tiny/{variant}-seed{seed}",
        "seed": seed,
        "data.fps": 8.0,
        "bench/subject_consistency": score,
        "bench/first_frame_pixels_at_10s": score / 2,
        **metrics,
    }


def cells(line):
    return [c.strip() for c in line.split("|")[1:-1]]


def test_latest_run_per_config_then_seeds_averaged():
    df = pd.DataFrame(
        [
            row("on", 0, 1, 0.10),
            row("on", 0, 5, 0.50),  # the rerun replaces the first
            row("on", 1, 2, 0.70),
            row("off", 0, 3, 0.20),
        ]
    )
    kept = results.latest(df)
    assert sorted(kept["run_id"]) == ["r2", "r3", "r5"]
    means = results.seed_means(kept).set_index("variant")
    assert means.loc["on", "bench/subject_consistency"] == pytest.approx(0.60)
    assert (means.loc["on", "seeds"], means.loc["off", "seeds"]) == (2, 1)


def test_bench_rows_follow_the_table_contract_and_show_hidden_variants():
    df = pd.DataFrame([row("on", 0, 1, 0.4), row("sliding", 0, 2, 0.3, ablation_="memory", memory="sliding")])
    rows = results.bench_rows(df)
    assert list(rows["subject_consistency"]) == [0.4, 0.3]
    assert list(rows["first_frame_pixels_at_10s"]) == [0.2, 0.15]
    assert list(rows["memory"]) == ["slowfast; erft=on", "sliding"]  # memory variants are already visible


def test_write_tables_renders_each_ablation_per_preset_in_variant_order(tmp_path):
    cfg = load_config("smoke")
    df = pd.DataFrame(
        [
            row(
                "on",
                0,
                1,
                0.9,
                **{
                    "teacher_erft/psnr_long_all": 27.25,
                    "teacher/psnr_long_all": 25.0,
                    "teacher/steps": 1800.0,
                    "teacher/cut_short": 1.0,
                    "student/untrained_revisit_psnr": 15.0,
                    "student/distilled_revisit_psnr": 20.0,
                    "cdmd2/distilled_revisit_psnr": 22.5,
                    "pipeline/teacher_seconds": 90.0,
                },
            ),
            row("off", 0, 2, 0.8, **{"teacher/psnr_long_all": 26.0, "teacher/steps": 2000.0,
                                      "teacher/cut_short": 0.0}),
            row("full", 0, 3, 0.7, ablation_="", memory="full", preset="smoke"),
        ]
    )
    written = results.write_tables(cfg, out=tmp_path, runs=df)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "smoke/pipelines.csv",
        "smoke/pipelines.md",
        "smoke/pipelines.seeds.csv",
        "tiny/erft.csv",
        "tiny/erft.md",
        "tiny/erft.seeds.csv",
    ]
    md = (tmp_path / "tiny" / "erft.md").read_text()
    assert md.startswith("# erft: error-recycling fine-tuning of the teacher\n")
    lines = md.splitlines()
    # ablations/erft.yaml lists on before off, whatever order the runs came in
    on = next(i for i, line in enumerate(lines) if line.startswith("| context_forcing (slowfast; erft=on)"))
    off = next(i for i, line in enumerate(lines) if line.startswith("| context_forcing (slowfast; erft=off)"))
    assert on < off
    assert "## Teacher continuation PSNR (dB) on held-out clips" in md
    teacher = lines[lines.index("## Teacher continuation PSNR (dB) on held-out clips") + 4 :][:2]
    assert [cells(line)[:4] for line in teacher] == [
        # the ERFT teacher when it ran; the teacher's own steps, a dagger where a wall clock cut them short
        ["context_forcing (slowfast; erft=on)", "teacher_erft", "1,800†", "27.2"],
        ["context_forcing (slowfast; erft=off)", "teacher", "2,000", "26.0"],
    ]
    gen = lines[
        lines.index("## Generator stages vs the untrained student: revisit PSNR (dB), held-out worlds") + 2 :
    ]
    assert cells(gen[0]) == ["model", "untrained", "student", "cdmd2"]  # cdmd1 was never measured
    assert cells(gen[2]) == ["context_forcing (slowfast; erft=on)", "15.0", "20.0", "22.5"]
    assert cells(gen[3]) == ["context_forcing (slowfast; erft=off)", "-", "-", "-"]
    times = lines[lines.index("## Training time per stage (minutes)") + 2 :]
    assert cells(times[0]) == ["model", "teacher"] and cells(times[2])[1] == "1.5"
    assert "## Revisit PSNR" not in md  # nothing measured: the section is left out, not faked
    csv = pd.read_csv(tmp_path / "tiny" / "erft.csv")
    assert list(csv["variant"]) == ["on", "off"] and list(csv["seeds"]) == [1, 1]
    assert (
        results.write_tables(cfg, ablations=["pipelines"], out=tmp_path / "x", runs=df)[0].name
        == "pipelines.md"
    )


SCORES = {"similarity": 0.9, "uniform1": 0.8, "uniform2": 0.7}


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """The promotion grid at smoke on a one-stage toy pipeline (a bench that logs fixed numbers and a
    3-step loss curve) in a fresh store; returns (tmp dir, the store overrides)."""
    from cf.metrics.columns import first_frame_column, revisit_column

    tmp = tmp_path_factory.mktemp("toy_store")

    def bench(cfg, out_dir, inputs, parent_run_id):
        d = Path(out_dir) / "bench"
        d.mkdir(parents=True, exist_ok=True)
        with tracking.start_run(cfg, "bench", parent_run_id=parent_run_id):
            score = SCORES[cfg.tracking.run_name]
            metrics = {"bench/subject_consistency": score,
                       f"bench/{revisit_column('psnr', 4, 6)}": 20 * score,
                       f"bench/{revisit_column('retention', 4, 6)}": score}
            for t in (1, 2):
                metrics[f"bench/{first_frame_column('pixels', t)}"] = score / t
            tracking.log_metrics(metrics)
            for step in (1, 2, 3):
                tracking.log_metrics({"bench/toy_loss": score / step}, step=step)
        return d

    stages = (pipeline.Stage("bench", bench, pipeline.bench_config, publish=(("bench", "bench"),)),)
    store = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment=t"]
    ab = ablation.load_ablation("promotion")
    cfgs = ablation.variant_configs(ab, "smoke", overrides=store, out=str(tmp / "runs"))
    for v, c in cfgs.items():
        c.tracking.run_name = v  # lets the toy tell the variants apart
    ablation.run_ablation(ab, cfgs, stages, stream=io.StringIO())
    return tmp, store


LABELS = [f"context_forcing (slowfast; promotion={v})" for v in SCORES]


def test_tables_from_a_real_store_after_a_grid_on_a_toy_bench(toy_store):
    tmp, store = toy_store
    assert main(["tables", "--preset", "smoke", "--results", str(tmp / "res"), *store]) == 0
    md = (tmp / "res" / "smoke" / "promotion.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| context_forcing")]
    assert [cells(line)[0] for line in lines[:3]] == LABELS
    assert cells(lines[0])[1:3] == ["90.00", "45.00"] and cells(lines[2])[1:3] == ["70.00", "35.00"]
    assert "## Revisit PSNR (dB) by lag" in md and "18.0" in md


def test_committed_seed_rows_rebuild_the_tables_on_a_machine_without_the_store(toy_store, tmp_path):
    """`cf tables` commits every run behind a table (<ablation>.seeds.csv); another machine, whose store
    lacks those runs, merges them with its own, so a grid's seeds accumulate across sessions."""
    tmp, store = toy_store
    res = tmp_path / "res"
    assert main(["tables", "--preset", "smoke", "--results", str(res), *store]) == 0
    seeds = pd.read_csv(res / "smoke" / "promotion.seeds.csv")
    assert len(seeds) == 3 and set(seeds["variant"]) == set(SCORES)
    md = (res / "smoke" / "promotion.md").read_text()
    elsewhere = [f"tracking.uri=sqlite:///{tmp_path / 'other.db'}", "tracking.experiment=t"]
    assert main(["tables", "--preset", "smoke", "--results", str(res), *elsewhere]) == 0
    assert (res / "smoke" / "promotion.md").read_text() == md
    # a store run of the same configuration and seed, newer, replaces the committed row
    newer = seeds.iloc[:1].assign(run_id="newer", start_time=seeds["start_time"].max() + 1,
                                  **{"bench/subject_consistency": 0.5})
    merged = results.latest(results.with_committed_seeds(newer, res))
    assert len(merged) == 3
    assert merged.set_index("variant").loc[newer["variant"].iloc[0], "bench/subject_consistency"] == 0.5


def test_lag_bins_sit_at_their_geometric_centre_and_an_empty_curve_plots_nothing():
    x = curves.lag_centres([0.0, 1.0, 4.0, 40.0], [0.5, 4.0, 9.0, float("inf")])
    assert list(x) == pytest.approx([0.125**0.5, 2.0, 6.0, 50.0])  # 0 floored at 0.25 s; open bin at 1.25 lo
    empty = curves.revisit_curves(pd.DataFrame(columns=["preset", "ablation", "label"]), "psnr")
    assert curves.lag_centres(empty["lo_s"], empty["hi_s"]).shape == (0,)  # object dtype: once a TypeError


def test_what_the_notebooks_plot_comes_from_the_store_or_the_committed_tables(toy_store, tmp_path):
    tmp, store = toy_store
    cfg = load_config("smoke", overrides=store)
    rows, source = curves.load_rows(cfg, results_dir=tmp_path / "nothing")
    assert source == "MLflow (t)" and list(rows["label"]) == LABELS
    ff = curves.first_frame_curves(rows)
    got = {(r.label, r.t): round(r.value, 6) for r in ff.itertuples()}
    assert got == {(lab, t): round(s / t, 6) for lab, s in zip(LABELS, SCORES.values()) for t in (1.0, 2.0)}
    rv = curves.revisit_curves(rows, "psnr")
    assert list(rv["lo_s"]) == [4, 4, 4] and list(rv["hi_s"]) == [6, 6, 6]
    assert list(rv["value"]) == pytest.approx([18.0, 16.0, 14.0])
    assert list(curves.revisit_curves(rows)["value"]) == pytest.approx(list(SCORES.values()))  # retention
    hist = curves.training_curves(cfg)
    assert set(hist["stage"]) == {"bench"} and set(hist["metric"]) == {"bench/toy_loss"}
    sim = hist[hist["label"] == LABELS[0]].sort_values("step")
    assert list(sim["step"]) == [1, 2, 3] and list(sim["value"]) == pytest.approx([0.9, 0.45, 0.3])
    # a fresh clone: no store, but the committed tables
    results.write_tables(cfg, out=tmp_path / "res")
    empty = load_config("smoke", overrides=[f"tracking.uri=sqlite:///{tmp_path / 'none.db'}"])
    rows2, source2 = curves.load_rows(empty, results_dir=tmp_path / "res")
    assert source2 == f"{len(LABELS)} committed per-seed row(s)" and list(rows2["label"]) == LABELS
    pd.testing.assert_frame_equal(curves.first_frame_curves(rows2), ff)
    # the store's runs and another machine's committed seeds of the same grid are one table
    assert curves.load_rows(cfg, results_dir=tmp_path / "res")[1] == "MLflow (t)"  # same runs: no doubles
    # a grid with a seed-mean table but no per-seed rows (an older table) still plots
    for f in (tmp_path / "res").glob("*/*.seeds.csv"):
        f.unlink()
    rows3, source3 = curves.load_rows(empty, results_dir=tmp_path / "res")
    assert source3.startswith("1 committed table(s)") and list(rows3["label"]) == LABELS
    pd.testing.assert_frame_equal(curves.first_frame_curves(rows3), ff)
    assert curves.load_rows(empty, results_dir=tmp_path / "nothing")[1] == "no runs yet"


def test_rollout_and_training_benchmarks_as_frames(tmp_path):
    (tmp_path / "rollout_x.json").write_text(
        json.dumps(
            {"preset": "x", "runs": {"sink": {"chunk_latency_s": [0.01, 0.02], "kv_bytes": [2**20, 2**21]}}}
        )
    )
    (tmp_path / "train_x.json").write_text(
        json.dumps(
            {
                "preset": "x",
                "stages": [
                    {"preset": "x", "stage": "teacher", "step_s": 0.1, "mfu": 0.02, "samples_per_s": 80.0}
                ],
            }
        )
    )
    roll = curves.rollout_curves(tmp_path)
    assert roll.to_dict("list") == {
        "preset": ["x", "x"],
        "policy": ["sink", "sink"],
        "chunk": [1, 2],
        "ms": [10.0, 20.0],
        "kv_mib": [1.0, 2.0],
    }
    train = curves.train_benchmarks(tmp_path)
    assert train.to_dict("records") == [
        {"preset": "x", "stage": "teacher", "step_ms": 100.0, "mfu": 0.02, "samples_per_s": 80.0}
    ]


@pytest.mark.slow
def test_make_notebooks_executes_every_notebook_headless(toy_store, tmp_path):
    tmp, store = toy_store
    figs = tmp_path / "fig"
    argv = ["notebooks", "--preset", "smoke", "--out", str(tmp_path), "--figures", str(figs), *store]
    assert main(argv) == 0
    assert {p.name for p in (tmp_path / "notebooks").iterdir()} == {
        "claims.ipynb",
        "consistency.ipynb",
        "performance.ipynb",
        "training.ipynb",
    }
    names = {p.name for p in figs.iterdir()}
    assert {"consistency_smoke_promotion_pixels.png", "revisit_smoke_promotion.png"} <= names
    assert any(n.startswith("training_smoke_context_forcing") for n in names)
    assert any(n.startswith("rollout_") for n in names)  # from the committed benchmarks


def test_tables_on_an_empty_store_say_so(tmp_path, capsys):
    # an empty results folder too: committed per-seed rows there would rebuild tables (as they should)
    rc = main(["tables", "--preset", "smoke", "--results", str(tmp_path / "res"),
               f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    assert rc == 0 and "no finished pipeline runs" in capsys.readouterr().out
    assert not (tmp_path / "m.db").exists()  # reading a fresh clone's store does not create one


def test_ui_serves_the_store_cf_logs_to_on_localhost_only(tmp_path):
    from cf.commands.ui import ui_command

    cmd = ui_command(f"sqlite:///{tmp_path}/mlflow.db", 5001)
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    args = dict(zip(cmd[4::2], cmd[5::2]))
    assert args == {
        "--backend-store-uri": f"sqlite:///{tmp_path}/mlflow.db",
        "--host": "127.0.0.1",
        "--port": "5001",
        "--default-artifact-root": (tmp_path / "mlruns").as_uri(),
    }
    assert "--default-artifact-root" not in ui_command("http://tracking.example:5000", 5001)


def test_teacher_curve_reads_steps_psnr_and_retention_per_teacher_length():
    row = {"preset": "tiny", "ablation": "teacher_curve", "teacher_erft/psnr_long_all": 15.0,
           "bench/revisit_retention": 0.4}
    rows = pd.DataFrame([
        {**row, "variant": "t16_1k", "teacher/steps": 1000.0, "teacher_erft/psnr_long_memory": 14.0},
        {**row, "variant": "t16_8k", "teacher/steps": 6321.0, "teacher_erft/psnr_long_memory": 18.0},  # cut
        {**row, "variant": "t4_2k", "teacher/steps": float("nan"), "teacher_erft/psnr_long_memory": 13.0,
         "teacher_erft/psnr_long_memory_ci_lo": 12.0, "teacher_erft/psnr_long_memory_ci_hi": 14.5},
        {**row, "ablation": "claims", "variant": "context_forcing", "teacher/steps": 2000.0},  # another grid
    ])
    tc = teacher_curve.teacher_curve(rows)
    seen = tc[tc["measure"] == "psnr_seen"]
    assert list(zip(seen["context"], seen["steps"], seen["value"])) == [(4, 2000.0, 13.0), (16, 1000.0, 14.0),
                                                                        (16, 6321.0, 18.0)]
    assert (seen["lo"].iloc[0], seen["hi"].iloc[0]) == (12.0, 14.5)  # steps: the reached count, else planned
    assert set(tc["measure"]) == {"psnr_seen", "psnr_all", "retention"} and len(tc) == 9
    assert teacher_curve.teacher_curve(rows[rows["ablation"] == "claims"]).empty
    # the grid's table: one row per teacher length and measure, one column per step count reached
    lines = teacher_curve.table(rows).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert cells[0] == ["teacher", "measure", "1,000 steps", "2,000 steps", "6,321 steps"]
    seen16 = next(c for c in cells if c[0] == "16-frame" and "seen before" in c[1])
    assert seen16[2:] == ["14.0", "-", "18.0"]
    assert teacher_curve.table(rows[rows["ablation"] == "claims"]) is None
