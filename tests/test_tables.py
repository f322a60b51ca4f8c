"""Results tables: exact Markdown for known rows, the column contract, MLflow-safe names, clear errors."""

import math

import pandas as pd
import pytest

from cf.bench import tables
from cf.errors import CfError
from cf.metrics import columns
from cf.tracking import metric_key

NAN = math.nan


@pytest.fixture
def rows():
    return pd.DataFrame(
        [
            {
                "method": "context_forcing",
                "memory": "slowfast",
                "weights": "trained",
                "first_frame_dino_at_10s": 0.91454,
                "first_frame_dino_at_20s": 0.8925,
                "background_consistency_clip": 0.9595,
                "subject_consistency_dino": 0.95681,
                "subject_consistency_dino_long": 0.9,
                "background_consistency_clip_long": 0.8,
                "subject_consistency_dino_whole": 0.7,
                "fps": 17.04,
                "total": 0.8245,
                "dynamic_degree": 0.5,
                "moving_fraction": 0.625,
                "motion_smoothness": 0.98765,
                "drift_first_to_last": -0.0356,
                "realism_fd_imagenet": 12.345,
                "revisit_retention": 0.876,
                "effective_context_s": 40.0,
                "effective_context_is_lower_bound": 1.0,
                "revisit_retention_lag_0-0.5s": 0.991,
                "revisit_retention_lag_16-20s": 0.62,
                "revisit_psnr_lag_0-0.5s": 30.12,
                "revisit_psnr_lag_16-20s": 22.04,
                "data.fps": 8.0,
            },
            {
                "method": "longlive",
                "memory": "sink",
                "weights": "untrained",
                "first_frame_dino_at_10s": 0.9125,
                "first_frame_dino_at_20s": NAN,
                "background_consistency_clip": 0.94921,
                "subject_consistency_dino": 0.9305,
                "subject_consistency_dino_long": NAN,
                "background_consistency_clip_long": 0.7,
                "fps": 20.7,
                "total": NAN,
                "dynamic_degree": 0.0,
                "motion_smoothness": 0.9,
                "drift_first_to_last": 0.01,
                "realism_fd_imagenet": NAN,
                "revisit_retention": 0.1,
                "effective_context_s": 1.5,
                "effective_context_is_lower_bound": 0.0,
                "revisit_retention_lag_0-0.5s": 0.9,
                "revisit_retention_lag_16-20s": NAN,
                "revisit_psnr_lag_0-0.5s": 28.0,
                "revisit_psnr_lag_16-20s": NAN,
                "data.fps": 8.0,
            },
        ]
    )


def test_table1_renders_known_rows_exactly(rows):
    expected = (
        "| model                       |   dino @10s |   dino @20s |   Subj (dino) |   BG (clip) "
        "|   Subj long-range (dino) |   BG long-range (clip) |\n"
        "|:----------------------------|------------:|------------:|--------------:|------------:"
        "|-------------------------:|-----------------------:|\n"
        "| context_forcing (slowfast)  |       91.45 |       89.25 |         95.68 |       95.95 "
        "|                    90.00 |                  80.00 |\n"
        "| longlive (sink) [untrained] |       91.25 |           - |         93.05 |       94.92 "
        "|                        - |                  70.00 |\n"
    )
    assert tables.table1(rows) == expected


def test_table2_renders_known_rows_exactly(rows):
    got = tables.table2(rows).splitlines()
    head = [c.strip() for c in got[0].split("|")[1:-1]]
    assert head == ["model", "FPS", "Total", "Subj (dino)", "BG (clip)", "Subj long-range (dino)",
                    "BG long-range (clip)", "Dynamic", "Moving", "Smooth", "Drift", "FD (imagenet)",
                    "Retention", "Context (s)"]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in got[2:]]
    assert cells[0] == ["context_forcing (slowfast)", "17.0", "82.45", "95.68", "95.95", "90.00", "80.00",
                        "50.00", "62.50", "98.77", "-3.56", "12.3", "0.88", "≥40.00"]
    assert cells[1] == ["longlive (sink) [untrained]", "20.7", "-", "93.05", "94.92", "-", "70.00", "0.00",
                        "-", "90.00", "+1.00", "-", "0.10", "1.50"]


def test_one_backbone_for_both_consistencies_is_one_column_named_after_it():
    df = pd.DataFrame([{"method": "self_forcing", "memory": "sliding", "first_frame_imagenet_at_10s": 0.5,
                        "consistency_imagenet": 0.6, "consistency_imagenet_long": 0.4,
                        "consistency_imagenet_whole": 0.55}])
    head = [c.strip() for c in tables.table2(df).splitlines()[0].split("|")[1:-1]]
    assert [h for h in head if "onsist" in h] == ["Consist. (imagenet)", "Consist. long-range (imagenet)"]
    assert "BG" not in " ".join(head) and "Subj" not in " ".join(head)


def test_revisit_table_renders_known_rows_exactly(rows):
    expected = (
        "| lag (s)   |   context_forcing (slowfast) |   longlive (sink) [untrained] |\n"
        "|:----------|-----------------------------:|------------------------------:|\n"
        "| 0-0.5     |                         0.99 |                          0.90 |\n"
        "| 16-20     |                         0.62 |                             - |\n"
    )
    assert tables.revisit_table(rows) == expected
    psnr = tables.revisit_table(rows, "psnr").splitlines()
    assert [c.strip() for c in psnr[2].split("|")[1:-1]] == ["0-0.5", "30.1", "28.0"]


def test_rows_without_optional_columns_render_dashes():
    df = pd.DataFrame([{"method": "self_forcing", "memory": "sliding", "first_frame_pixels_at_1s": 0.5}])
    cells = [c.strip() for c in tables.table2(df).splitlines()[2].split("|")[1:-1]]
    assert cells[0] == "self_forcing (sliding)" and set(cells[1:]) == {"-"}
    assert [c.strip() for c in tables.table1(df).splitlines()[2].split("|")[1:-1]] == [
        "self_forcing (sliding)",
        "50.00",
    ]


def test_column_names_round_trip_through_mlflow_and_the_parsers():
    ff = tables.first_frame_column("imagenet", 10.0)
    half = tables.first_frame_column("dinov2", 2.5)
    lag = columns.revisit_column("lpips", 0.5, 1.0)
    cons = columns.consistency_column("subject", "dino", "long_range")
    assert (ff, half, lag, cons) == (
        "first_frame_imagenet_at_10s",
        "first_frame_dinov2_at_2.5s",
        "revisit_lpips_lag_0.5-1s",
        "subject_consistency_dino_long",
    )
    for col in (ff, half, lag, cons, "consistency_imagenet", "effective_context_s"):
        assert metric_key(f"bench/{col}") == f"bench/{col}"  # stored in MLflow exactly as named
    df = pd.DataFrame([[0.1] * 7], columns=["method", "memory", half, ff, lag, "revisit_psnr_lag_4-6s",
                                            "revisit_psnr_lag_48-56s"])
    assert tables.first_frame_columns(df) == {"dinov2": [(2.5, half)], "imagenet": [(10.0, ff)]}
    assert tables.revisit_bins(df, "psnr") == [(4.0, 6.0, "revisit_psnr_lag_4-6s"),
                                               (48.0, 56.0, "revisit_psnr_lag_48-56s")]
    assert tables.revisit_bins(df, "lpips") == [(0.5, 1.0, lag)]
    assert columns.consistency_columns([cons, "consistency_imagenet"]) == [
        ("consistency_imagenet", "both", "imagenet", "clips"), (cons, "subject", "dino", "long_range")]


def test_bad_rows_fail_with_the_contract():
    with pytest.raises(CfError, match=r"no column\(s\) \['memory'\].*'method' and 'memory'"):
        tables.table2(pd.DataFrame([{"method": "longlive"}]))
    with pytest.raises(CfError, match="no first_frame_<backbone>_at_<T>s columns"):
        tables.table1(pd.DataFrame([{"method": "longlive", "memory": "sink"}]))
    with pytest.raises(CfError, match="no revisit_retention_lag_<lo>-<hi>s columns"):
        tables.revisit_table(pd.DataFrame([{"method": "longlive", "memory": "sink"}]))
