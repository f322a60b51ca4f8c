"""Files of the consistency benchmark: per-video files, results (CSV, Markdown, JSON), plots.

`cf.bench.consistency` measures; this module only writes what it measured (layout in its docstring).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cf.bench import plots, tables
from cf.bench.entries import BenchResult, Entry
from cf.utils import atomic_path, atomic_write_json, atomic_write_text

VIEW_SIZE = 256  # the mp4 is enlarged to about this many pixels on its longer side


def write_video_files(
    stem: Path,
    frames: np.ndarray,
    pairs: list,
    masks: np.ndarray,
    meta: dict,
    scores: dict,
    entry: Entry,
    fps: float,
) -> list[Path]:
    """One video (uint8 [T, H, W, 3]) and its scored revisit pairs with their masks [P, H, W]:
    <stem>.gif (native size) and .mp4 (enlarged) to watch, <stem>.frames.npz (key ``frames``: the
    exact pixels that were scored; a gif of more than 256 colours is quantised), and the `cf score`
    sidecar <stem>.json + <stem>.revisit_masks.npz."""
    from cf.video import write_video

    h, w = frames.shape[1:3]
    gif = write_video(stem.with_suffix(".gif"), frames, fps)
    mp4 = write_video(stem.with_suffix(".mp4"), frames, fps, scale=max(1, VIEW_SIZE // max(h, w)))
    exact = stem.with_name(stem.name + ".frames.npz")
    mask_file = stem.with_name(stem.name + ".revisit_masks.npz")
    for path, key, array in ((exact, "frames", frames), (mask_file, "masks", masks)):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **{key: array})
    sidecar = {
        **meta,
        "fps": fps,
        "frames": len(frames),
        "weights": entry.weights,
        "generator": str(entry.generator or ""),
        "camera": meta["camera"][: len(frames)],
        "revisits": [{"t_first": a, "t_revisit": b, "lag": c} for a, b, c in pairs],
        "scores": scores,
    }
    return [gif, mp4, exact, atomic_write_json(stem.with_suffix(".json"), sidecar), mask_file]


def _reference(ref: dict) -> str:
    """A realism reference's description in a few words (bench.json keeps all of it)."""
    what = f"{ref.get('frames')} real frames"
    if ref.get("source") == "world":
        return f"{what} of {len(ref.get('seeds', []))} world clips from reference seeds"
    return f"{what} from {ref.get('path')}"


def write_results(result: BenchResult, out_dir: Path, scorer, entries: list[Entry], cfg) -> list[Path]:
    """results/: the four CSVs, the Markdown tables (titled with what produced them) and bench.json."""
    res = out_dir / "results"
    files = []
    for name, df in (
        ("runs", result.runs),
        ("videos", result.videos),
        ("first_frame", result.first_frame),
        ("revisit", result.revisit),
    ):
        with atomic_path(res / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        files.append(res / f"{name}.csv")
    info = scorer.describe()
    note = (
        f"{cfg.preset} preset, {cfg.bench.seconds:g} s per video, seeds {list(cfg.bench.seeds)}; "
        f"backbone: {info['backbone_label']}"
        + ("" if info["background_backbone"] == info["backbone"]
           else f"; background: {info['background_backbone_label']}")
        + (f"; realism: against {_reference(info['realism']['reference'])}" if info.get("realism") else "")
    )
    if any(e.generator is None for e in entries):
        note += "; [untrained]: random weights, not a trained method"
    texts = {
        "table1": (
            "Table 1: first-frame consistency (x100) per segment end; VBench BG / Subj",
            tables.table1(result.runs),
        ),
        "table2": (
            "Table 2: summary (consistencies x100; drift = last - first segment, x100)",
            tables.table2(result.runs),
        ),
    }
    if tables.revisit_bins(result.runs):
        texts["revisit"] = (
            "Revisit retention by lag (1 = reproduces what it showed, 0 = chance)",
            tables.revisit_table(result.runs, "retention"),
        )
        if tables.revisit_bins(result.runs, "sink_share"):
            texts["revisit_sink"] = (
                "Share of the compared pixels the clean context frames showed, by lag (what an attention "
                "sink could serve; 0 = out of its reach)",
                tables.revisit_table(result.runs, "sink_share"),
            )
        texts["revisit_psnr"] = ("Revisit PSNR (dB) by lag", tables.revisit_table(result.runs, "psnr"))
        texts["revisit_chance"] = (
            "Chance PSNR (dB) by lag: the revisit frame against first visits of other places",
            tables.revisit_table(result.runs, "chance_psnr"),
        )
        if tables.revisit_bins(result.runs, "lpips"):
            texts["revisit_lpips"] = (
                f"Revisit LPIPS by lag ({info['lpips']})",
                tables.revisit_table(result.runs, "lpips"),
            )
    for name, (title, body) in texts.items():
        files.append(atomic_write_text(res / f"{name}.md", f"**{title}.** {note}.\n\n{body}"))
    rows = json.loads(result.runs.to_json(orient="records"))
    files.append(
        atomic_write_json(
            res / "bench.json",
            {
                **info,
                "preset": cfg.preset,
                "seconds": cfg.bench.seconds,
                "seeds": list(cfg.bench.seeds),
                "entries": [
                    {
                        "name": e.name,
                        "method": e.method,
                        "memory": e.memory,
                        "weights": e.weights,
                        "generator": str(e.generator or ""),
                    }
                    for e in entries
                ],
                "runs": rows,
            },
        )
    )
    return files


def write_plots(result: BenchResult, measured: list[dict], out_dir: Path, cfg) -> list[Path]:
    """plots/: consistency vs time, revisit error vs lag, and the frame strips of the first seed."""
    pl = out_dir / "plots"
    fps, seconds = float(cfg.data.fps), float(cfg.bench.seconds)
    times = plots.strip_times(seconds, float(cfg.bench.segment_s))
    truth = measured[0]["strip"][1]
    files = [plots.first_frame_vs_time(result.runs, pl / "first_frame.png")]
    if tables.revisit_bins(result.runs):
        files.append(plots.revisit_vs_lag(result.runs, pl / "revisit.png"))
    rows = [("world (truth)", truth)] + [(m["entry"].label, m["strip"][0]) for m in measured]
    seed = int(cfg.bench.seeds[0])
    files.append(
        plots.frame_strip(
            pl / "frames.png",
            rows,
            times,
            fps,
            title=f"seed {seed}: the world and each generator at fixed times",
        )
    )
    for m in measured:
        files.append(
            plots.frame_strip(
                pl / f"strip_{m['entry'].name}.png",
                [rows[0], (m["entry"].label, m["strip"][0])],
                times,
                fps,
                title=f"{m['entry'].label}, seed {seed}",
            )
        )
    return files
