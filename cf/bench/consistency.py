"""The long-video consistency benchmark: generate per method x memory policy, score, tabulate, plot, log.

An `Entry` is one generator to benchmark: a method's config (with its memory policy) and the path of
its generator weights, or None for random ("untrained") weights. `plan_entries` builds them for
``bench.methods`` x ``bench.policies`` from ``<runs>/<method>-<memory>-seed<seed>/generator.safetensors``
(the stage contract); `run_consistency` benchmarks a list of them (the pipeline calls it with one).

Per entry and per seed k of ``bench.seeds``: `cf.generation.generate` rolls the student sampler
out on the held-out world ``data.eval_seed + k`` (its prompt and camera path; noise seeded by k) for
``bench.seconds`` in all, continuing the world's first ``student.context_frames`` clean frames as the
student was trained to (0: from noise alone), and `cf.metrics.VideoScorer` scores it as saved (uint8
pixels), with the revisit pairs of the world's camera whose revisit frame is generated and the
background masks of the world's ground truth. Every entry sees the same worlds and the same clean
frames, so entries differ only by generator. `cf.bench.report` writes the files.

Outputs in `out_dir` (untrained entries carry "-untrained" in their names and "[untrained]" in labels):
  results/runs.csv          one row per entry: the column contract of `cf.bench.tables`
  results/videos.csv        one row per (entry, seed), the same score columns
  results/first_frame.csv   long form: entry, backbone, segment start/end (s), frames, value
  results/revisit.csv       long form: entry, lag (frames), lag_s, pairs, mse, psnr, lpips
  results/table1.md, table2.md, revisit.md (+ revisit_lpips.md with LPIPS): the paper's layouts
  results/bench.json        the scorer's labels and settings, entries, the per-run rows
  plots/first_frame.png     first-frame consistency vs time, one line per entry, a panel per backbone
  plots/revisit.png         revisit PSNR (and LPIPS) vs lag
  plots/frames.png          the world's frames and each entry's at fixed times (seed bench.seeds[0])
  plots/strip_<entry>.png   the same strip, one entry against the world
  videos/<entry>/seed<k>.gif, .mp4      to watch (`cf score` reads them with the sidecar below)
  videos/<entry>/seed<k>.frames.npz     the exact pixels scored (key ``frames``, uint8 [T, H, W, 3])
  videos/<entry>/seed<k>.json, .revisit_masks.npz   prompt, camera, fps, revisit pairs, scores; masks

MLflow: one run, stage ``bench``. With one entry its tags ``method``/``memory``/``weights`` are that
entry's, it carries the entry's config as params and ``bench/<column>`` metrics (names as in
`cf.bench.tables`), and every file as an artifact. With several entries the run's ``method``/``memory``
tags list them, it holds results/ and plots/, and each entry gets a nested ``bench`` run with its own
config, tags, metrics and videos: the runs with a ``bench/subject_consistency`` metric are the rows.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from cf import tracking
from cf.bench import report
from cf.bench.entries import OWN, BenchResult, Entry, as_entry, bench_metrics, generator_path, plan_entries
from cf.errors import CfError
from cf.metrics.columns import score_columns

__all__ = [
    "OWN",
    "BenchResult",
    "Entry",
    "as_entry",
    "bench_frames",
    "generator_path",
    "plan_entries",
    "run_consistency",
]


def bench_frames(cfg) -> int:
    """Frames per benchmark video: ``bench.seconds`` of world time (at least 3, for the motion metrics)."""
    n = int(round(cfg.bench.seconds * cfg.data.fps))
    if n < 3:
        raise CfError(
            f"bench.seconds={cfg.bench.seconds:g} at data.fps={cfg.data.fps} gives {n} frames; "
            f"the scores need at least 3: raise bench.seconds"
        )
    return n


def _check(cfg, entries: list[Entry]) -> None:
    if not entries:
        raise CfError("run_consistency got no entries; build them with cf.bench.plan_entries")
    if not list(cfg.bench.seeds):
        raise CfError("bench.seeds is empty; give at least one seed, e.g. bench.seeds=[0]")
    for e in entries:
        for key in ("data.fps", "data.height", "data.width"):
            if OmegaConf.select(e.cfg, key) != OmegaConf.select(cfg, key):
                raise CfError(
                    f"entry {e.name} has {key}={OmegaConf.select(e.cfg, key)} but the benchmark "
                    f"config has {OmegaConf.select(cfg, key)}; every entry must see the same world"
                )


# ------------------------------------------------------------------------------------------- running


def run_consistency(
    cfg, entries, out_dir: str | Path, parent_run_id: str | None = None, *, progress: bool = True,
    images: list[Path] | None = None,
) -> BenchResult:
    """Benchmark `entries` (`Entry`s, or mappings for `as_entry`) with the settings of ``cfg.bench`` and
    write everything into `out_dir` (see the module docstring). `parent_run_id` nests the MLflow run
    under a pipeline's run. `images`: start every video from a picture instead of the world's frames
    (each picture with each seed; `cf.data.start`), so consistency with the start is measured on them."""
    from tqdm import tqdm

    from cf.metrics import VideoScorer, get_backbone
    from cf.metrics.realism import config_reference
    from cf.utils import pick_device, set_threads

    entries = [as_entry(cfg, e) for e in entries]
    _check(cfg, entries)
    out_dir = Path(out_dir)
    set_threads(cfg.trainer.threads)
    device = pick_device(cfg.device)
    scorer = VideoScorer(cfg, device=device)
    seeds = [int(s) for s in cfg.bench.seeds]
    scorer.attach_realism(config_reference(cfg, bench_world(cfg).data, seeds), stride=REALISM_STRIDE)
    extra = [
        get_backbone(n, cfg.bench.weights, clip_activation=cfg.bench.clip_activation)
        for n in dict.fromkeys(cfg.bench.table_backbones)
        if n != scorer.backbone.name
    ]
    single = len(entries) == 1
    top = entries[0] if single else None
    files: list[Path] = []
    bar = tqdm(
        total=len(entries) * len(seeds) * max(1, len(images or ())),
        desc="cf bench consistency",
        unit="video",
        file=sys.stderr,
        disable=not progress,
    )
    with tracking.start_run(
        top.cfg if single else cfg, "bench", parent_run_id=parent_run_id, extra_tags=_tags(*entries)
    ) as run:
        _rename(run, top)
        measured = []
        for entry in entries:
            m = _bench_entry(cfg, entry, seeds, scorer, extra, device, out_dir, bar, images)
            measured.append(m)
            files += m["files"]
            if not single:
                with tracking.start_run(
                    entry.cfg, "bench", parent_run_id=run.run_id, extra_tags=_tags(entry)
                ) as child:
                    _rename(child, entry)
                    child.log_metrics(bench_metrics(m["row"]))
                    _log_files(child, m["files"], out_dir)
        bar.close()
        result = _collect(measured, scorer, extra)
        written = report.write_results(result, out_dir, scorer, entries, cfg)
        written += report.write_plots(result, measured, out_dir, cfg)
        files += written
        if single:
            run.log_metrics(bench_metrics(result.runs.iloc[0].to_dict()))
        _log_files(run, files if single else written, out_dir)
        result.files, result.run_id = files, run.run_id
    return result


def _load_model(entry: Entry, device):
    from cf.model import build_model

    torch.manual_seed(entry.cfg.seed)  # random weights are reproducible: the same seed, the same model
    return build_model(entry.cfg, device, weights=entry.generator).eval()


def _bench_entry(cfg, entry: Entry, seeds: list[int], scorer, extra, device, out_dir: Path, bar,
                 images: list[Path] | None = None) -> dict:
    """Generate and score one entry's videos; returns its per-run row, per-video rows, curves, files."""
    from cf.data.start import image_clip
    from cf.data.world import World
    from cf.generation import generate, load_picture, picture_context
    from cf.metrics import FirstFrameConsistency, embed_frames
    from cf.rollout import ChunkTimer
    from cf.video import to_uint8

    model = _load_model(entry, device)
    n_frames, fps = bench_frames(cfg), float(cfg.data.fps)
    chunk, n_ctx = entry.cfg.model.frames_per_chunk, entry.cfg.student.context_frames
    if images:  # a picture is the context: at least one chunk of it
        n_ctx = picture_context(entry.cfg)
    if n_frames <= n_ctx:
        raise CfError(
            f"bench.seconds={cfg.bench.seconds:g} gives {n_frames} frames, no more than the "
            f"student.context_frames={n_ctx} clean frames the student continues: raise bench.seconds"
        )
    n_chunks = -(-(n_frames - n_ctx) // chunk)
    scorer.reset()
    curves = {b.name: FirstFrameConsistency(cfg.bench.segment_s).to(device) for b in extra}
    videos, files, latencies, strip = [], [], [], None
    for seed, image in [(s, i) for i in images or [None] for s in seeds]:
        bar.set_postfix_str(f"{entry.name} seed {seed}: generating")
        ecfg = bench_world(entry.cfg)
        ecfg.seed = seed  # the noise; the world comes from world_seed
        world_seed = cfg.data.eval_seed + seed
        timer = ChunkTimer(device)
        picture, crop = load_picture(ecfg, image, "--image-dir") if image is not None else (None, None)
        video, meta = generate(ecfg, model, n_chunks, sampler="student", context=n_ctx, world_seed=world_seed,
                               image=picture, callbacks=[timer])
        latencies += timer.latencies
        frames = to_uint8(video[:n_frames])  # [T, H, W, 3]: scored as saved
        world = World(ecfg.data, world_seed)
        clip = world.render(n_frames) if image is None else image_clip(world, picture, n_ctx, n_frames)
        pairs, masks = generated_revisits(clip, n_ctx)
        bar.set_postfix_str(f"{entry.name} seed {seed}: scoring")
        scores = scorer.score(frames, fps, pairs or None, masks if pairs else None, clip.camera)
        for b in extra:
            curve = curves[b.name](embed_frames(b, torch.from_numpy(frames).to(device))[None], fps)
            scores[f"first_frame_{b.name}"] = _curve_rows(curve)
        stem = out_dir / "videos" / entry.name / (f"seed{seed}" + (f"-{image.stem}" if image else ""))
        meta["image"] = crop
        files += report.write_video_files(stem, frames, pairs, masks, meta, scores, entry, fps)
        videos.append(
            {
                **_identity(entry),
                "seed": seed,
                "world_seed": world_seed,
                "image": image.name if image else "",
                "prompt": meta["prompt"],
                **_score_columns(scores, scorer.backbone.name, extra),
            }
        )
        if strip is None:
            strip = (frames, to_uint8(clip.video))
        bar.update(1)
    agg = scorer.aggregate()
    for b in extra:
        agg[f"first_frame_{b.name}"] = _curve_rows(curves[b.name].compute())
    cols = _score_columns(agg, scorer.backbone.name, extra)
    generated = len(videos) * n_chunks * chunk * entry.cfg.model.video_frames_per_latent
    cols["fps"] = generated / sum(latencies)
    cols["ms_per_chunk"] = 1e3 * statistics.median(latencies)
    row = {
        **_identity(entry),
        "preset": entry.cfg.preset,
        "data.fps": fps,
        "seeds": json.dumps(seeds),
        "seconds": n_frames / fps,
        "context_frames": n_ctx,
        "images": json.dumps([i.name for i in images or []]),
        "generator": str(entry.generator or ""),
        **cols,
    }
    return {"entry": entry, "row": row, "videos": videos, "agg": agg, "strip": strip, "files": files}


def bench_world(cfg):
    """A copy of `cfg` whose world moves as the benchmark's does: ``bench.camera_path`` (``tour``: revisit
    lags out to ``bench.long_lag_s``). The training world is left as it is: only the camera path and its
    longest lag change, the panorama, speed and subjects do not."""
    out = copy.deepcopy(cfg)
    out.data.camera_path = cfg.bench.camera_path
    out.data.revisit_lags = [max(2, int(round(cfg.bench.long_lag_s * cfg.data.fps)))]
    return out


REALISM_STRIDE = 4  # every 4th generated frame enters the Fréchet distance (neighbours are near copies)


def generated_revisits(clip, n_ctx: int) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """The world's revisit pairs whose revisit frame is generated (t_revisit >= n_ctx; between two clean
    context frames a revisit is exact by construction) and whose mask is not empty, with their masks
    [P, H, W] (`Clip.revisit_masks`)."""
    masks = clip.revisit_masks()
    keep = [i for i, (_, t2, _) in enumerate(clip.revisits) if t2 >= n_ctx and masks[i].any()]
    return [clip.revisits[i] for i in keep], masks[keep]


def _curve_rows(curve: dict) -> list[dict]:
    """A FirstFrameConsistency result -> [{start_s, end_s, frames, value}] (as VideoScorer writes it)."""
    curve = {k: torch.atleast_1d(v).tolist() for k, v in curve.items()}
    return [
        {"start_s": s, "end_s": e, "frames": int(n), "value": None if math.isnan(v) else v}
        for s, e, n, v in zip(curve["start_s"], curve["end_s"], curve["frames"], curve["value"])
    ]


def _identity(entry: Entry) -> dict:
    return {"entry": entry.name, "method": entry.method, "memory": entry.memory, "weights": entry.weights}


def _score_columns(s: dict, backbone: str, extra) -> dict:
    """A VideoScorer result (one video or the aggregate) -> the flat columns of the row contract."""
    return score_columns(s, {b.name: s[f"first_frame_{b.name}"] for b in extra})


def _collect(measured: list[dict], scorer, extra) -> BenchResult:
    runs = pd.DataFrame([m["row"] for m in measured])
    videos = pd.DataFrame([v for m in measured for v in m["videos"]])
    ff, rv = [], []
    for m in measured:
        ident = _identity(m["entry"])
        names = [(scorer.backbone.name, "first_frame_consistency")] + [
            (b.name, f"first_frame_{b.name}") for b in extra
        ]
        for backbone, key in names:
            ff += [{**ident, "backbone": backbone, **seg} for seg in m["agg"][key]]
        rv += [{**ident, **lag} for lag in (m["agg"]["revisit"] or {"by_lag": []})["by_lag"]]
    return BenchResult(runs, videos, pd.DataFrame(ff), pd.DataFrame(rv))


# --------------------------------------------------------------------------------------------- MLflow


def _tags(*entries: Entry) -> dict:
    """One entry's method/memory/weights/generator; for several, the distinct values joined by commas."""
    keys = {
        "method": lambda e: e.method,
        "memory": lambda e: e.memory,
        "weights": lambda e: e.weights,
        "generator": lambda e: str(e.generator or "untrained"),
    }
    tags = {k: ",".join(dict.fromkeys(get(e) for e in entries)) for k, get in keys.items()}
    if len(entries) > 1:
        del tags["generator"]
    return tags


def _rename(run, entry: Entry | None) -> None:
    """Untrained runs say so in their MLflow name too."""
    if entry is not None and entry.generator is None:
        cfg = entry.cfg
        base = cfg.tracking.run_name or f"{cfg.method}-{cfg.memory.policy}-{cfg.preset}"
        run.set_tags({"mlflow.runName": f"{base}-untrained/bench"})


def _log_files(run, files: list[Path], out_dir: Path) -> None:
    for f in files:
        rel = f.parent.relative_to(out_dir) if f.is_relative_to(out_dir) else None
        run.log_artifact(f, str(rel) if rel is not None and str(rel) != "." else None)
