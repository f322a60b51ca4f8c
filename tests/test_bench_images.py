"""`cf bench consistency --image-dir DIR`: long rollouts started from real photographs (scikit-image's),
scored like the world's, with the picture as frame 0 of every video (so first-frame consistency is consistency
with the picture) and revisit pairs from the camera that pans away from it and back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cf.cli import main
from cf.image import load_image

SKIMAGE_DATA = Path(pytest.importorskip("skimage").__file__).parent / "data"
PICTURES = ("astronaut.png", "rocket.jpg")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_images")
    pictures = root / "pictures"
    pictures.mkdir()
    for name in PICTURES:
        shutil.copy(SKIMAGE_DATA / name, pictures / name)
    (pictures / "notes.txt").write_text("not a picture, and not read: only .png / .jpg / .jpeg are")
    out = root / "out"
    rc = main(["bench", "consistency", "--preset", "smoke", "--untrained", "--method", "context_forcing",
               "--memory", "slowfast", "--image-dir", str(pictures), "--out", str(out),
               f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "bench.seeds=[0]",
               "bench.table_backbones=[pixels]",
               "bench.realism_backbone=random"])  # realism is not the question here (pixels' FD: 30 s)
    assert rc == 0
    return out


def test_one_video_per_picture_starting_with_it(bench):
    videos = pd.read_csv(bench / "results" / "videos.csv")
    assert sorted(videos["image"]) == sorted(PICTURES) and len(videos) == 2
    runs = pd.read_csv(bench / "results" / "runs.csv")
    assert json.loads(runs["images"].iloc[0]) == sorted(PICTURES) and runs["context_frames"].iloc[0] == 4
    for name in PICTURES:
        stem = bench / "videos" / "context_forcing-slowfast-untrained" / f"seed0-{Path(name).stem}"
        frames = np.load(stem.with_name(stem.name + ".frames.npz"))["frames"]
        picture, crop = load_image(SKIMAGE_DATA / name, 16, 16)
        assert np.array_equal(frames[0], picture) and np.array_equal(frames[3], picture)
        side = json.loads(stem.with_suffix(".json").read_text())
        assert side["image"]["box"] == crop["box"] and side["image"]["original_size"] == crop["original_size"]
        assert side["revisits"], "the camera comes back: revisit pairs are scored"
        xs = [c[0] for c in side["camera"]]
        assert xs[:5] == [xs[0]] * 5
    # consistency with the picture, per segment, for both videos
    ff = pd.read_csv(bench / "results" / "first_frame.csv")
    assert len(ff) and ff["value"].notna().all()


def test_a_bad_picture_in_the_folder_stops_the_benchmark_before_anything_runs(tmp_path, capsys):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    shutil.copy(SKIMAGE_DATA / "coffee.png", pictures / "coffee.png")
    (pictures / "broken.jpg").write_bytes((SKIMAGE_DATA / "rocket.jpg").read_bytes()[:500])
    out = tmp_path / "out"
    rc = main(["bench", "consistency", "--preset", "smoke", "--untrained", "--image-dir", str(pictures),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--image-dir" in err and "broken.jpg" in err and not out.exists()
    rc = main(["bench", "consistency", "--preset", "smoke", "--untrained", "--image-dir",
               str(tmp_path / "none"), "--out", str(out)])
    assert rc == 2 and "no such folder" in capsys.readouterr().err and not out.exists()
