"""The README's "Start from your own image" figure: generators started from scikit-image's photographs, each
video at frame 0 (the picture) and where the camera is back over the picture nearest 10 s and 60 s, with the
picture's retention at every return (1 - error(return, picture) / chance; cf.metrics.revisit).

    python docs/image_start_figure.py --generator undistilled=RUNS/cache/teacher_erft-*/teacher_erft/last.ckpt
        --generator cdmd2=RUNS/context_forcing-slowfast-seed0-*/generator.safetensors
        --rows undistilled:astronaut:slowfast,undistilled:astronaut:sliding,cdmd2:astronaut:slowfast
        [--preset tiny] [--method context_forcing] [--seconds 60] [--out docs/figures/image_start_tiny.png]

A generator is a `.safetensors` of cf's network or a Lightning checkpoint (a teacher stage's `last.ckpt`: its
network under `net.`, read here with the student's sampler, as the generator evaluation's "undistilled" row).
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


def load_generator(cfg, path: str | None):
    from cf.model import build_model
    from cf.model.runtime import load_weights

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, "cpu")
    if path is not None:
        prefix = "net." if path.endswith(".ckpt") and _has_prefix(path, "net.") else "model."
        load_weights(model, path, prefix=prefix)
    return model.eval()


def _has_prefix(path: str, prefix: str) -> bool:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return any(k.startswith(prefix) for k in blob.get("state_dict", {}))


def run(cfg, model, picture: str, seconds: float) -> dict:
    from skimage import data as skdata

    from cf.generation import generate, load_picture, picture_context
    from cf.metrics.revisit import chance_errors, chance_frames, retention, revisit_errors
    from cf.video import to_uint8

    path = Path(skdata.__file__).parent / (picture if "." in picture else f"{picture}.png")
    frame, crop = load_picture(cfg, path)
    n_ctx = picture_context(cfg)
    n_frames = int(round(seconds * cfg.data.fps))
    n_chunks = -(-(n_frames - n_ctx) // cfg.model.frames_per_chunk)
    video, meta = generate(cfg, model, n_chunks, context=n_ctx, image=frame)
    video = video[:n_frames]
    camera = meta["camera"][:n_frames]
    back = returns([c[0] for c in camera], n_ctx, cfg.data.width)
    pairs = torch.tensor([[0, t, t] for t in back])
    refs = chance_frames(pairs, torch.tensor(camera), (cfg.data.height, cfg.data.width))
    mse = revisit_errors(video, pairs)["mse"]
    chance = chance_errors(video, pairs, None, refs)["mse"]
    fps = cfg.data.fps
    return {"picture": path.name, "crop": crop["box_in_original"], "returns_s": [t / fps for t in back],
            "retention": retention(mse, chance).tolist(), "frames": to_uint8(video), "back": back, "fps": fps,
            "promoted": meta["promoted"]}


def figure(rows: list[dict], out: Path, title: str, seconds: float) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 2.3 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), 4, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1, 1.7]})
    low = min(-0.3, min(min(r["retention"]) for r in rows) - 0.1)
    for r, row in zip(axes, rows):
        fps, back, ret = row["fps"], row["back"], row["retention"]
        cells = [(0, "frame 0: the picture")]
        for s in (10.0, seconds):
            i = min(range(len(back)), key=lambda k: abs(back[k] / fps - s))
            cells.append((back[i], f"{back[i] / fps:.1f} s, back over it\nretention {ret[i]:.2f}"))
        for ax, (t, label) in zip(r[:3], cells):
            ax.imshow(row["frames"][t], interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        r[0].set_ylabel(f"{row['generator']}, {row['policy']}\n{row['picture']}", fontsize=8)
        ax = r[3]
        ax.plot(row["returns_s"], ret, marker="o", ms=3)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_ylim(low, 1.05)
        ax.set_xlim(0, seconds)
        ax.set_xlabel("return time (s) = lag since the picture", fontsize=8)
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
    p.add_argument("--generator", action="append", default=[], metavar="LABEL=PATH",
                   help="a generator to start from pictures (repeat); LABEL=untrained for random weights")
    p.add_argument("--rows", required=True, metavar="LABEL:PICTURE:POLICY,...",
                   help="one figure row each: generator label, scikit-image picture name, memory policy")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--method", default="context_forcing")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", default=str(ROOT / "docs" / "figures" / "image_start_tiny.png"))
    p.add_argument("overrides", nargs="*", help="config overrides, as the generators were trained")
    args = p.parse_args()
    from cf.config import load_config

    paths = {"untrained": None, **dict(g.split("=", 1) for g in args.generator)}
    rows, models = [], {}
    for spec in args.rows.split(","):
        label, picture, policy = spec.split(":")
        cfg = load_config(args.preset, args.method, [*args.overrides, f"memory.policy={policy}"])
        if label not in models:
            models[label] = load_generator(cfg, paths[label])
        row = {"generator": label, "policy": policy, **run(cfg, models[label], picture, args.seconds)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("frames", "back")}))
    h, w = rows[0]["frames"].shape[1:3]
    title = (f"{args.method} pipeline at {args.preset}, started from scikit-image photographs ({w}x{h} "
             f"frames, {args.seconds:g} s); retention: 1 = the picture, 0 = chance")
    print(figure(rows, Path(args.out), title, args.seconds))


if __name__ == "__main__":
    main()
