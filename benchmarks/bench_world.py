"""How fast the synthetic world renders: it must never be what training waits for.

Two figures per preset:
- render: frames per second of `World.render` on one world (panorama slicing + subject pasting +
  ground truth: background, age, revisits), in long clips;
- stream: frames per second of `WorldDataset`, where every clip is a fresh world (panorama,
  landmarks, subjects built from its seed) rendered from a random time: what training consumes.

Run: ``.venv/bin/python -m benchmarks.bench_world`` -> benchmarks/results/world.json and a table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import torch

from cf.config import load_config
from cf.data.datasets import WorldDataset
from cf.data.world import World
from cf.utils import atomic_write_json, git_sha

RESULTS = Path(__file__).resolve().parent / "results" / "world.json"


def best_rate(fn, items: int, repeats: int) -> float:
    """items per second of the fastest of `repeats` calls (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return items / best


def bench(preset: str, render_frames: int, stream_clips: int, repeats: int) -> dict:
    cfg = load_config(preset)
    d = cfg.data
    world = World(d, 0)
    world.render(render_frames)  # builds the camera path and warms caches (photos, shapes)
    render_fps = best_rate(lambda: world.render(render_frames), render_frames, repeats)
    ds = WorldDataset(d)
    next(iter(ds))
    clips = best_rate(lambda: list(itertools.islice(iter(ds), stream_clips)), stream_clips, repeats)
    builds = best_rate(lambda: [World(d, (1, i)) for i in range(stream_clips)], stream_clips, repeats)
    build_ms = 1000.0 / builds
    return {
        "preset": preset,
        "height": d.height,
        "width": d.width,
        "texture": d.texture,
        "n_subjects": d.n_subjects,
        "clip_frames": d.clip_frames,
        "render_frames_per_s": round(render_fps),
        "stream_clips_per_s": round(clips, 1),
        "stream_frames_per_s": round(clips * d.clip_frames),
        "world_build_ms": round(build_ms, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["smoke", "tiny"])
    p.add_argument("--render-frames", type=int, default=2048)
    p.add_argument("--stream-clips", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = [bench(preset, args.render_frames, args.stream_clips, args.repeats) for preset in args.presets]
    atomic_write_json(args.out, {
        "benchmark": "world",
        "git_sha": git_sha(short=True),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    # other processes slow a shared machine down; best-of-N only partly hides it
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "method": f"best of {args.repeats}: render {args.render_frames} frames of one world; stream "
                  f"{args.stream_clips} clips of fresh worlds through WorldDataset (one process)",
        "results": rows,
    })
    head = f"{'preset':<8}{'size':>8}{'render fr/s':>14}{'stream fr/s':>14}{'clips/s':>10}{'build ms':>10}"
    print(head)
    for r in rows:
        print(f"{r['preset']:<8}{r['height']:>4}x{r['width']:<3}{r['render_frames_per_s']:>14,}"
              f"{r['stream_frames_per_s']:>14,}{r['stream_clips_per_s']:>10}{r['world_build_ms']:>10}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
