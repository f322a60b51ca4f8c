"""`cf bench consistency` at smoke: files, tables and plots, aggregation, `cf score` round trip, MLflow,
trained weights actually loaded, and the error for a missing generator."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from cf import tracking
from cf.bench import tables
from cf.bench.consistency import run_consistency
from cf.bench.entries import Entry, as_entry, generator_path, plan_entries
from cf.cli import main
from cf.config import load_config
from cf.data.world import World
from cf.errors import CfError
from cf.metrics import VideoScorer, read_sidecar
from cf.metrics import score as score_module
from cf.metrics.lpips_net import Lpips
from cf.model import build_model
from cf.registry import UnknownNameError
from cf.video import read_video, to_uint8

# self_forcing at its own policy (sliding) and context_forcing at its own (slowfast); 2 seeds of 4 s
OVERRIDES = [
    "bench.methods=[self_forcing,context_forcing]",
    "bench.policies=[own]",
    "bench.seeds=[0,1]",
    "bench.table_backbones=[random]",
]
ENTRIES = ["self_forcing-sliding-untrained", "context_forcing-slowfast-untrained"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "out"
    rc = main(
        [
            "bench",
            "consistency",
            "--preset",
            "smoke",
            "--untrained",
            "--out",
            str(out),
            f"tracking.uri={uri}",
            *OVERRIDES,
        ]
    )
    assert rc == 0
    return out, uri


def _csv(out, name):
    return pd.read_csv(out / "results" / f"{name}.csv")


def test_writes_results_with_the_row_contract(bench):
    out, _ = bench
    runs, videos = _csv(out, "runs"), _csv(out, "videos")
    assert runs["entry"].tolist() == ENTRIES
    assert runs[["method", "memory", "weights"]].values.tolist() == [
        ["self_forcing", "sliding", "untrained"],
        ["context_forcing", "slowfast", "untrained"],
    ]
    segments = [f"first_frame_{b}_at_{t}s" for b in ("pixels", "random") for t in (1, 2, 3, 4)]
    scores = [
        "consistency_pixels",  # one backbone computes both of VBench's consistencies: one column
        "consistency_pixels_long",
        "motion_smoothness",
        "dynamic_degree",
        "total",
        "drift_first_to_last",
        "drift_slope_per_s",
        "effective_context_s",
        "revisit_psnr",
        "fps",
        "ms_per_chunk",
    ]
    assert set(segments + scores) <= set(runs.columns)
    assert list(tables.first_frame_columns(runs)) == ["pixels", "random"]  # bench.backbone comes first
    assert runs[segments + scores].notna().all().all()
    assert not {"subject_consistency", "background_consistency"} & set(runs.columns)
    assert tables.revisit_bins(runs) and not tables.revisit_bins(runs, "lpips")  # smoke: lpips off
    assert videos[["entry", "seed"]].values.tolist() == [[e, s] for e in ENTRIES for s in (0, 1)]
    assert videos["world_seed"].tolist() == [1_000_000, 1_000_001] * 2  # data.eval_seed + seed


def test_run_rows_aggregate_the_videos(bench):
    """VBench scores are means over videos; with equal-length videos, so is each pooled segment."""
    out, _ = bench
    runs, videos = _csv(out, "runs").set_index("entry"), _csv(out, "videos")
    means = videos.groupby("entry").mean(numeric_only=True)
    for col in (
        "consistency_pixels",
        "consistency_pixels_long",
        "motion_smoothness",
        "first_frame_pixels_at_2s",
        "first_frame_random_at_4s",
    ):
        assert np.allclose(runs.loc[ENTRIES, col], means.loc[ENTRIES, col], rtol=0, atol=1e-9), col
    total = runs[["consistency_pixels", "motion_smoothness", "dynamic_degree"]]
    assert np.allclose(runs["total"], total.mean(axis=1), atol=1e-12)
    ff = _csv(out, "first_frame")
    cf = ff[(ff.entry == ENTRIES[1]) & (ff.backbone == "pixels")]
    assert cf["end_s"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert cf["frames"].tolist() == [14, 16, 16, 16]  # 2 videos x 8 frames a second, frame 0 left out
    assert np.allclose(
        cf["value"], runs.loc[ENTRIES[1], [f"first_frame_pixels_at_{t}s" for t in (1, 2, 3, 4)]]
    )


def test_markdown_tables_render_the_csv_rows(bench):
    out, _ = bench
    runs = _csv(out, "runs")
    for name, render in (
        ("table1", tables.table1),
        ("table2", tables.table2),
        ("revisit", tables.revisit_table),
    ):
        text = (out / "results" / f"{name}.md").read_text()
        title, body = text.split("\n\n", 1)
        assert "[untrained]: random weights" in title and "smoke preset, 4 s per video, seeds [0, 1]" in title
        assert body == render(runs)
    table1 = (out / "results" / "table1.md").read_text()
    assert "| self_forcing (sliding) [untrained]" in table1 and "random @4s" in table1
    assert not (out / "results" / "revisit_lpips.md").exists()


def test_plots_and_videos(bench):
    out, _ = bench
    pngs = ["first_frame", "revisit", "frames"] + [f"strip_{e}" for e in ENTRIES]
    for name in pngs:
        with Image.open(out / "plots" / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    for e in ENTRIES:
        for seed in (0, 1):
            for suffix in (".gif", ".mp4", ".json", ".revisit_masks.npz"):
                assert (out / "videos" / e / f"seed{seed}{suffix}").is_file()
    a, b = (np.load(out / "videos" / e / "seed0.frames.npz")["frames"] for e in ENTRIES)
    assert a.shape == b.shape == (32, 16, 16, 3) and a.dtype == np.uint8
    # both continue the world's first student.context_frames=4 clean frames, then generate
    cfg = load_config("smoke")
    world = to_uint8(World(cfg.data, cfg.data.eval_seed).render(32).video)
    assert np.array_equal(a[:4], world[:4]) and np.array_equal(b[:4], world[:4])
    assert not np.array_equal(a[4:], world[4:])
    assert not np.array_equal(a, b)  # the same random weights and noise: the memory policy differs
    side = json.loads((out / "videos" / ENTRIES[0] / "seed0.json").read_text())
    assert side["context_frames"] == 4 and side["revisits"]
    assert min(r["t_revisit"] for r in side["revisits"]) >= 4  # only generated frames are revisits
    gif, fps = read_video(out / "videos" / ENTRIES[0] / "seed0.gif")
    assert gif.shape == a.shape


def test_saved_video_rescores_to_the_same_numbers(bench, capsys):
    """The exact frames and the sidecar (fps, revisits, masks) repeat the benchmark's scores, and
    `cf score` reads the same sidecar beside the gif."""
    out, _ = bench
    stem = out / "videos" / ENTRIES[1] / "seed1"
    side = read_sidecar(stem.with_suffix(".json"))
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["weights"] == "untrained" and meta["world_seed"] == 1_000_001 and len(side["revisits"]) > 0
    frames = np.load(stem.with_name("seed1.frames.npz"))["frames"]
    r = VideoScorer(load_config("smoke")).score(frames, side["fps"], side["revisits"], side["masks"],
                                                side["camera"])
    row = _csv(out, "videos").set_index(["entry", "seed"]).loc[(ENTRIES[1], 1)]
    got = {
        "consistency_pixels": r["consistency"][0]["clips"],
        "motion_smoothness": r["motion_smoothness"],
        "revisit_psnr": r["revisit"]["psnr"],
        "effective_context_s": r["effective_context_s"],
    }
    for col, value in got.items():
        assert value == pytest.approx(row[col], abs=1e-12), col
    assert main(["score", str(stem.with_suffix(".gif")), "--preset", "smoke", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)["videos"][0]
    assert scored["fps_source"] == "sidecar" and scored["frames"] == 32
    assert scored["revisit"]["pairs"] == r["revisit"]["pairs"] == len(side["revisits"])


def test_one_mlflow_run_with_a_nested_run_per_entry(bench):
    out, uri = bench
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cf").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted(
        (r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.data.tags["method"]
    )
    assert len(parent) == 1 and len(children) == 2
    p = parent[0]
    assert p.data.tags["stage"] == "bench" and p.data.tags["method"] == "self_forcing,context_forcing"
    assert p.data.tags["weights"] == "untrained" and not p.data.metrics
    assert {a.path for a in client.list_artifacts(p.info.run_id, "results")} >= {
        "results/runs.csv",
        "results/table1.md",
        "results/table2.md",
        "results/revisit.md",
    }
    expected = _csv(out, "runs").set_index("method")
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == p.info.run_id and tags["stage"] == "bench"
        assert tags["weights"] == "untrained" and child.info.run_name.endswith("-untrained/bench")
        row = expected.loc[tags["method"]]
        assert tags["memory"] == row["memory"] and child.data.params["memory.policy"] == row["memory"]
        for col in ("consistency_pixels", "first_frame_pixels_at_3s", "revisit_retention", "fps"):
            assert child.data.metrics[f"bench/{col}"] == pytest.approx(row[col], rel=1e-12)
        names = {a.path for a in client.list_artifacts(child.info.run_id, f"videos/{row['entry']}")}
        assert f"videos/{row['entry']}/seed0.gif" in names


def test_one_entry_logs_into_one_run_under_the_pipeline(bench, tmp_path, monkeypatch):
    """The pipeline's call: one entry (the mapping form), nested under its run, with metrics and every
    file on that run; with an LPIPS net (a random one here), LPIPS by lag joins the results."""
    _, uri = bench
    monkeypatch.setattr(score_module, "lpips_or_reason", lambda weights: (Lpips(random=True), None))
    cfg = load_config(
        "smoke", "longlive", [f"tracking.uri={uri}", "tracking.experiment=single", "bench.lpips=true"]
    )
    with tracking.start_run(cfg, "pipeline") as parent:
        entry = {"method": "longlive", "policy": "sink", "generator": None}
        res = run_consistency(cfg, [entry], tmp_path / "bench", parent_run_id=parent.run_id, progress=False)
    client = MlflowClient(uri)
    run = client.get_run(res.run_id)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id and tags["stage"] == "bench"
    assert (tags["method"], tags["memory"], tags["weights"]) == ("longlive", "sink", "untrained")
    assert run.data.metrics == res.metrics() and "bench/first_frame_pixels_at_4s" in run.data.metrics
    assert res.metrics()["bench/consistency_pixels"] == res.runs.loc[0, "consistency_pixels"]
    logged = set()
    for folder in ("results", "plots", "videos/longlive-sink-untrained"):
        logged |= {a.path for a in client.list_artifacts(res.run_id, folder)}
    assert logged == {str(f.relative_to(tmp_path / "bench")) for f in res.files}

    lags = tables.revisit_bins(res.runs, "lpips")
    assert [lag[:2] for lag in lags] == [lag[:2] for lag in tables.revisit_bins(res.runs, "psnr")]
    assert res.runs[[c for _, _, c in lags]].notna().all().all() and "bench/revisit_lpips" in run.data.metrics
    assert np.allclose(res.revisit["lpips"], res.runs.loc[0, [c for _, _, c in lags]].astype(float))
    title, body = (tmp_path / "bench" / "results" / "revisit_lpips.md").read_text().split("\n\n", 1)
    assert "test only" in title and body == tables.revisit_table(res.runs, "lpips")


def _save_generator(cfg, path, seed):
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_trained_generator_is_loaded_from_the_runs_folder(bench, tmp_path):
    """Weights equal to the untrained ones reproduce the untrained scores exactly; other weights do not."""
    out, _ = bench
    cfg = load_config(
        "smoke",
        "context_forcing",
        ["tracking.enabled=false", "bench.seeds=[1]", "bench.table_backbones=[random]"],
    )
    entries = []
    for name, seed in (("same", 0), ("other", 7)):  # seed 0: what --untrained builds for seed=0
        runs_dir = tmp_path / name
        _save_generator(cfg, generator_path(runs_dir, "context_forcing", "slowfast", 0), seed)
        entries += plan_entries(
            "smoke", ["context_forcing"], ["slowfast"], ["tracking.enabled=false"], runs_dir
        )
    assert [e.generator for e in entries] == [
        tmp_path / n / "context_forcing-slowfast-seed0" / "generator.safetensors" for n in ("same", "other")
    ]
    res = run_consistency(cfg, entries, tmp_path / "out", progress=False)
    assert res.runs["weights"].tolist() == ["trained"] * 2 and res.run_id is None
    assert "untrained" not in "".join(str(f) for f in res.files)
    assert "[untrained]" not in (tmp_path / "out" / "results" / "table2.md").read_text()
    untrained = _csv(out, "videos").set_index(["entry", "seed"]).loc[(ENTRIES[1], 1)]
    same, other = res.videos.iloc[0], res.videos.iloc[1]
    for col in ("consistency_pixels", "revisit_psnr", "first_frame_random_at_2s"):
        assert same[col] == pytest.approx(untrained[col], abs=1e-12), col
    assert other["consistency_pixels"] != pytest.approx(untrained["consistency_pixels"], abs=1e-6)


def test_missing_generator_names_the_path_and_the_command(tmp_path, capsys):
    with pytest.raises(CfError) as e:
        plan_entries("smoke", ["self_forcing", "longlive"], ["own"], (), tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "self_forcing-sliding-seed0" / "generator.safetensors") in msg
    assert "make ablate MEMORY=sliding METHOD=self_forcing PRESET=smoke SEED=0" in msg
    assert "make ablate MEMORY=sink METHOD=longlive PRESET=smoke SEED=0" in msg
    assert "--untrained" in msg and "--runs" in msg
    rc = main(
        [
            "bench",
            "consistency",
            "--preset",
            "smoke",
            "--runs",
            str(tmp_path),
            "--seed",
            "3",
            "--method",
            "longlive",
            "--memory",
            "full",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "make ablate MEMORY=full METHOD=longlive PRESET=smoke SEED=3" in err
    assert str(tmp_path / "longlive-full-seed3" / "generator.safetensors") in err
    assert not (tmp_path / "out").exists()


def test_entries_bad_names_and_the_pipeline_form():
    with pytest.raises(
        UnknownNameError, match="valid memory policy names: full, own, sink, sliding, slowfast"
    ):
        plan_entries("smoke", ["context_forcing"], ["slowfsat"], untrained=True)
    with pytest.raises(CfError, match="nothing to benchmark"):
        plan_entries("smoke", [], ["own"], untrained=True)
    entries = plan_entries("smoke", ["longlive", "longlive"], ["own", "sink", "full"], untrained=True)
    assert [e.name for e in entries] == ["longlive-sink-untrained", "longlive-full-untrained"]
    cfg = load_config("smoke", "longlive")
    e = as_entry(cfg, {"method": "longlive", "policy": "sink", "generator": "g.safetensors"})
    assert isinstance(e, Entry) and e.cfg is cfg and e.name == "longlive-sink" and e.weights == "trained"
    other = as_entry(cfg, {"method": "self_forcing", "policy": "full", "generator": None})
    assert (other.method, other.memory, other.cfg.preset, other.label) == (
        "self_forcing",
        "full",
        "smoke",
        "self_forcing (full) [untrained]",
    )
    with pytest.raises(CfError, match="neither a cf.bench.Entry nor a mapping"):
        as_entry(cfg, {"method": "longlive"})
