"""Results tables: exact Markdown for known rows, the column contract, MLflow-safe names, clear errors."""

import math

import pandas as pd
import pytest

from cf.bench import tables
from cf.errors import CfError
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
                "background_consistency": 0.9595,
                "subject_consistency": 0.95681,
                "fps": 17.04,
                "total": 0.8245,
                "dynamic_degree": 0.5,
                "motion_smoothness": 0.98765,
                "drift_first_to_last": -0.0356,
                "effective_context_s": 4.0,
                "effective_context_is_lower_bound": 1.0,
                "revisit_psnr_lag_2": 30.12,
                "revisit_psnr_lag_16": 22.04,
                "data.fps": 8.0,
            },
            {
                "method": "longlive",
                "memory": "sink",
                "weights": "untrained",
                "first_frame_dino_at_10s": 0.9125,
                "first_frame_dino_at_20s": NAN,
                "background_consistency": 0.94921,
                "subject_consistency": 0.9305,
                "fps": 20.7,
                "total": NAN,
                "dynamic_degree": 0.0,
                "motion_smoothness": 0.9,
                "drift_first_to_last": 0.01,
                "effective_context_s": 1.5,
                "effective_context_is_lower_bound": 0.0,
                "revisit_psnr_lag_2": 28.0,
                "revisit_psnr_lag_16": NAN,
                "data.fps": 8.0,
            },
        ]
    )


def test_table1_renders_known_rows_exactly(rows):
    expected = (
        "| model                       |   dino @10s |   dino @20s |    BG |   Subj |\n"
        "|:----------------------------|------------:|------------:|------:|-------:|\n"
        "| context_forcing (slowfast)  |       91.45 |       89.25 | 95.95 |  95.68 |\n"
        "| longlive (sink) [untrained] |       91.25 |           - | 94.92 |  93.05 |\n"
    )
    assert tables.table1(rows) == expected


def test_table2_renders_known_rows_exactly(rows):
    expected = (
        "| model                       |   FPS |   Total |    BG |   Subj |   Dynamic |   Smooth |   Drift "
        "|   Context (s) |\n"
        "|:----------------------------|------:|--------:|------:|-------:|----------:|---------:|--------:"
        "|--------------:|\n"
        "| context_forcing (slowfast)  |  17.0 |   82.45 | 95.95 |  95.68 |     50.00 |    98.77 |   -3.56 "
        "|         ≥4.00 |\n"
        "| longlive (sink) [untrained] |  20.7 |       - | 94.92 |  93.05 |      0.00 |    90.00 |   +1.00 "
        "|          1.50 |\n"
    )
    assert tables.table2(rows) == expected


def test_revisit_table_renders_known_rows_exactly(rows):
    expected = (
        "| lag (frames)   |   lag (s) |   context_forcing (slowfast) |   longlive (sink) [untrained] |\n"
        "|:---------------|----------:|-----------------------------:|------------------------------:|\n"
        "| 2              |      0.25 |                         30.1 |                          28.0 |\n"
        "| 16             |         2 |                         22.0 |                             - |\n"
    )
    assert tables.revisit_table(rows) == expected


def test_rows_without_optional_columns_render_dashes():
    df = pd.DataFrame([{"method": "self_forcing", "memory": "sliding", "first_frame_pixels_at_1s": 0.5}])
    cells = [c.strip() for c in tables.table2(df).splitlines()[2].split("|")[1:-1]]
    assert cells == ["self_forcing (sliding)"] + ["-"] * len(tables.SUMMARY)
    assert [c.strip() for c in tables.table1(df).splitlines()[2].split("|")[1:-1]] == [
        "self_forcing (sliding)",
        "50.00",
        "-",
        "-",
    ]


def test_column_names_round_trip_through_mlflow_and_the_parsers():
    ff = tables.first_frame_column("imagenet", 10.0)
    half = tables.first_frame_column("dinov2", 2.5)
    lag = tables.revisit_column("lpips", 48)
    assert (ff, half, lag) == (
        "first_frame_imagenet_at_10s",
        "first_frame_dinov2_at_2.5s",
        "revisit_lpips_lag_48",
    )
    for col in (ff, half, lag, "subject_consistency", "effective_context_s"):
        assert metric_key(f"bench/{col}") == f"bench/{col}"  # stored in MLflow exactly as named
    df = pd.DataFrame(
        columns=["method", "memory", half, ff, lag, "revisit_psnr_lag_4", "revisit_psnr_lag_16"]
    )
    assert tables.first_frame_columns(df) == {"dinov2": [(2.5, half)], "imagenet": [(10.0, ff)]}
    assert tables.revisit_lags(df) == [(4, "revisit_psnr_lag_4"), (16, "revisit_psnr_lag_16")]
    assert tables.revisit_lags(df, "lpips") == [(48, lag)]


def test_bad_rows_fail_with_the_contract():
    with pytest.raises(CfError, match=r"no column\(s\) \['memory'\].*'method' and 'memory'"):
        tables.table2(pd.DataFrame([{"method": "longlive"}]))
    with pytest.raises(CfError, match="no first_frame_<backbone>_at_<T>s columns"):
        tables.table1(pd.DataFrame([{"method": "longlive", "memory": "sink"}]))
    with pytest.raises(CfError, match="no revisit_psnr_lag_<L> columns"):
        tables.revisit_table(pd.DataFrame([{"method": "longlive", "memory": "sink"}]))
