"""`cf tables`: MLflow pipeline runs -> rows -> results/<preset>/<ablation>.md + csv."""

import io
from pathlib import Path

import pandas as pd
import pytest

from cf import ablation, pipeline, results, tracking
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
            row("on", 0, 1, 0.9, **{"teacher_erft/psnr_long_all": 27.25, "teacher/psnr_long_all": 25.0}),
            row("off", 0, 2, 0.8, **{"teacher/psnr_long_all": 26.0}),
            row("full", 0, 3, 0.7, ablation_="", memory="full", preset="smoke"),
        ]
    )
    written = results.write_tables(cfg, out=tmp_path, runs=df)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "smoke/pipelines.csv",
        "smoke/pipelines.md",
        "tiny/erft.csv",
        "tiny/erft.md",
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
    assert [cells(line)[:3] for line in teacher] == [
        ["context_forcing (slowfast; erft=on)", "teacher_erft", "27.2"],  # the ERFT teacher when it ran
        ["context_forcing (slowfast; erft=off)", "teacher", "26.0"],
    ]
    assert "## Revisit PSNR" not in md  # nothing measured: the section is left out, not faked
    csv = pd.read_csv(tmp_path / "tiny" / "erft.csv")
    assert list(csv["variant"]) == ["on", "off"] and list(csv["seeds"]) == [1, 1]
    assert (
        results.write_tables(cfg, ablations=["pipelines"], out=tmp_path / "x", runs=df)[0].name
        == "pipelines.md"
    )


def test_tables_from_a_real_store_after_a_grid_on_a_toy_bench(tmp_path, capsys):
    from cf.bench.tables import first_frame_column, revisit_column

    def bench(cfg, out_dir, inputs, parent_run_id):
        d = Path(out_dir) / "bench"
        d.mkdir(parents=True, exist_ok=True)
        with tracking.start_run(cfg, "bench", parent_run_id=parent_run_id):
            score = {"similarity": 0.9, "uniform1": 0.8, "uniform2": 0.7}[
                cfg.tracking.run_name or "similarity"
            ]
            tracking.log_metrics(
                {
                    "bench/subject_consistency": score,
                    f"bench/{first_frame_column('pixels', 1)}": score,
                    f"bench/{revisit_column('psnr', 4)}": 20 * score,
                }
            )
        return d

    stages = (pipeline.Stage("bench", bench, pipeline.bench_config, publish=(("bench", "bench"),)),)
    store = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=t"]
    ab = ablation.load_ablation("promotion")
    cfgs = ablation.variant_configs(ab, "smoke", overrides=store, out=str(tmp_path / "runs"))
    for v, c in cfgs.items():
        c.tracking.run_name = v  # lets the toy tell the variants apart
    ablation.run_ablation(ab, cfgs, stages, stream=io.StringIO())

    rc = main(["tables", "--preset", "smoke", "--results", str(tmp_path / "res"), *store])
    assert rc == 0
    md = (tmp_path / "res" / "smoke" / "promotion.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| context_forcing")]
    assert [cells(line)[0] for line in lines[:3]] == [
        "context_forcing (slowfast; promotion=similarity)",
        "context_forcing (slowfast; promotion=uniform1)",
        "context_forcing (slowfast; promotion=uniform2)",
    ]
    assert "90.00" in lines[0] and "70.00" in lines[2]  # consistencies x100, per variant
    assert "## Revisit PSNR (dB) by lag" in md and "18.0" in md


def test_tables_on_an_empty_store_say_so(tmp_path, capsys):
    rc = main(["tables", "--preset", "smoke", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    assert rc == 0 and "no finished pipeline runs" in capsys.readouterr().out
    assert not (tmp_path / "m.db").exists()  # reading a fresh clone's store does not create one
