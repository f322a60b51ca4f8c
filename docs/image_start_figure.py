"""The README's "Start from your own image" figure: a generator started from scikit-image's photographs, its
video at frame 0 (the picture), and where the camera is back over the picture nearest 10 s and 60 s, with the
picture's retention at every return (1 - error(return, picture) / chance; cf.metrics.revisit).

    python docs/image_start_figure.py --ckpt RUNS/context_forcing-slowfast-seed0/generator.safetensors
        [--preset tiny] [--method context_forcing] [--policies slowfast,sliding] [--pictures astronaut,coffee]
        [--seconds 60] [--out docs/figures/image_start_tiny.png]

The camera is the training world's pingpong pan (data.camera_path), held still over the picture for the
context frames, so it comes back to the picture every few seconds and the picture's lag grows to the video's
length. Prints one JSON line per row with the numbers the figure shows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def returns(camera_x: list[int], n_ctx: int, width: int) -> list[int]:
    """Frames after the context at the picture's camera position, each after the picture left the view."""
    x0, out, away = camera_x[0], [], False
    for t in range(n_ctx, len(camera_x)):
        away = away or abs(camera_x[t] - x0) >= width
        if away and camera_x[t] == x0:
            out.append(t)
            away = False
    return out


def run(cfg, ckpt: str, picture: str, policy: str, seconds: float) -> dict:
    from skimage import data as skdata

    from cf.generation import generate, load_picture, picture_context
    from cf.metrics.revisit import chance_errors, chance_frames, retention, revisit_errors
    from cf.model import build_model
    from cf.video import to_uint8

    path = Path(skdata.__file__).parent / (picture if "." in picture else f"{picture}.png")
    cfg.memory.policy = policy
    frame, crop = load_picture(cfg, path)
    n_ctx = picture_context(cfg)
    chunk = cfg.model.frames_per_chunk
    n_frames = int(round(seconds * cfg.data.fps))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, "cpu", weights=ckpt).eval()
    video, meta = generate(cfg, model, -(-(n_frames - n_ctx) // chunk), context=n_ctx, image=frame)
    video = video[:n_frames]
    xs = [c[0] for c in meta["camera"]][:n_frames]
    back = returns(xs, n_ctx, cfg.data.width)
    pairs = torch.tensor([[0, t, t] for t in back])
    refs = chance_frames(pairs, torch.tensor(meta["camera"][:n_frames]), (cfg.data.height, cfg.data.width))
    mse = revisit_errors(video, pairs)["mse"]
    chance = chance_errors(video, pairs, None, refs)["mse"]
    ret = retention(mse, chance).tolist()
    fps = cfg.data.fps
    near = {s: min(range(len(back)), key=lambda i: abs(back[i] / fps - s)) for s in (10, seconds)}
    return {"picture": path.name, "policy": policy, "crop": crop["box_in_original"],
            "returns_s": [t / fps for t in back], "retention": ret, "frames": to_uint8(video), "near": near,
            "back": back, "fps": fps}


def figure(rows: list[dict], out: Path, title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 2.5 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), 4, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    for r, row in zip(axes, rows):
        fps, back, ret = row["fps"], row["back"], row["retention"]
        cells = [(0, "frame 0: the picture")]
        for s in sorted(row["near"]):
            i = row["near"][s]
            cells.append((back[i], f"{back[i] / fps:.1f} s (back over it)\nretention {ret[i]:.2f}"))
        for ax, (t, label) in zip(r[:3], cells):
            ax.imshow(row["frames"][t], interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        r[0].set_ylabel(f"{row['picture']}\n{row['policy']}", fontsize=8)
        ax = r[3]
        ax.plot(row["returns_s"], ret, marker="o", ms=3)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_ylim(-0.6, 1.05)
        ax.set_xlabel("time of the return (s) = lag since the picture", fontsize=8)
        ax.set_ylabel("retention of the picture", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None,
                   help="the generator (generator.safetensors of a pipeline run); none: random weights")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--method", default="context_forcing")
    p.add_argument("--policies", default="slowfast,sliding")
    p.add_argument("--pictures", default="astronaut,coffee")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", default=str(ROOT / "docs" / "figures" / "image_start_tiny.png"))
    p.add_argument("overrides", nargs="*", help="config overrides, as the generator was trained")
    args = p.parse_args()
    from cf.config import load_config

    rows = []
    for picture in args.pictures.split(","):
        for policy in args.policies.split(","):
            cfg = load_config(args.preset, args.method, list(args.overrides))
            row = run(cfg, args.ckpt, picture, policy, args.seconds)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("frames", "near", "back")}))
    h, w = rows[0]["frames"].shape[1:3]
    weights = "trained" if args.ckpt else "untrained (random weights)"
    title = (f"{args.method} at {args.preset}, {weights}, started from scikit-image photographs ({w}x{h} "
             f"frames); retention: 1 = the picture, 0 = chance")
    print(figure(rows, Path(args.out), title))


if __name__ == "__main__":
    main()
