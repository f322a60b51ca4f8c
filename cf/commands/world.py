"""`cf world`: sample videos of the synthetic world with their ground truth.

For video k (world seed ``(seed, k)``, from world time 0) it writes into --out:
  world_00k.mp4                  enlarged for viewing (H.264 is lossy: use the gif for exact pixels)
  world_00k.gif                  native resolution, exact pixels
  world_00k.json                 prompt, fps, camera path, per-frame camera, revisit pairs
  world_00k.revisit_masks.npz    key `masks`: bool [n_pairs, H, W], the pixels each revisit must match
  world_00k.contact.png          first visits (top row) beside their revisits (bottom row)
"""

COMMAND = ("world",)
HELP = "write sample videos of the synthetic world with revisit pairs, masks and a contact sheet"

# Columns of the contact sheet: revisit pairs shown per video, spread over the lags.
SHEET_PAIRS = 8
# The mp4 is enlarged to about this many pixels on its longer side.
VIEW_SIZE = 256


def add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=4, help="number of videos (default 4)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each video in seconds (default 8)")


def run(args, cfg) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from cf.data.world import World
    from cf.errors import CfError
    from cf.filecheck import check_writable_dir
    from cf.utils import atomic_write_json

    frames = int(round(args.seconds * cfg.data.fps))
    if args.n < 1 or frames < 1:
        raise CfError(f"--n {args.n} --seconds {args.seconds:g}: need at least one video of at least one "
                      f"frame (data.fps={cfg.data.fps})")
    out = check_writable_dir(Path(args.out) if args.out else Path(cfg.out) / "world", "--out")
    for k in tqdm(range(args.n), desc="cf world", unit="video"):
        clip = World(cfg.data, (cfg.seed, k)).render(frames, start=0)
        stem = out / f"world_{k:03d}"
        _write(clip, stem)
        atomic_write_json(stem.with_suffix(".json"), clip.to_json())
    size = f"{cfg.data.height}x{cfg.data.width}"
    print(f"wrote {args.n} videos of {frames} frames ({size} at {cfg.data.fps} fps) "
          f"to {out}")
    return 0


def _write(clip, stem) -> None:
    import numpy as np

    from cf.utils import atomic_path
    from cf.video import contact_sheet, write_video

    h, w = clip.video.shape[2:]
    write_video(stem.with_suffix(".mp4"), clip.video, clip.fps, scale=max(1, VIEW_SIZE // max(h, w)))
    write_video(stem.with_suffix(".gif"), clip.video, clip.fps)
    with atomic_path(stem.with_suffix(".revisit_masks.npz")) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, masks=clip.revisit_masks())
    sheet, video = stem.with_suffix(".contact.png"), clip.video
    if clip.revisits:
        pairs = _spread(clip.revisits, SHEET_PAIRS)
        contact_sheet(sheet, [video[[a for a, _, _ in pairs]], video[[b for _, b, _ in pairs]]],
                      row_labels=["first visit", "revisit"],
                      col_labels=[f"lag {lag}: t={a}->{b}" for a, b, lag in pairs],
                      title=f"{stem.name}: revisits at the same camera pose (background must match)")
    else:
        ts = np.unique(np.linspace(0, len(video) - 1, SHEET_PAIRS).round().astype(int)).tolist()
        contact_sheet(sheet, [video[ts]], col_labels=[f"t={t}" for t in ts],
                      title=f"{stem.name}: no revisit within {len(video)} frames (lengthen --seconds)")


def _spread(revisits: list, n: int) -> list:
    """Up to n revisit pairs with distinct lags spread from the shortest to the longest."""
    by_lag = {}
    for r in revisits:
        by_lag.setdefault(r[2], r)  # the first pair at each lag
    lags = sorted(by_lag)
    if len(lags) > n:
        lags = [lags[round(i * (len(lags) - 1) / (n - 1))] for i in range(n)] if n > 1 else lags[-1:]
    return [by_lag[lag] for lag in lags]
