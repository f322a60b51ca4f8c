"""`cf score PATH... [--backbone NAME] [--json] [--revisits FILE] [--weights PATH] [key=value ...]`

Scores videos on disk (files, or folders of mp4/webm/gif/...) with every metric of `cf.metrics`:
VBench(-Long) consistency (one column per backbone), first-frame consistency per segment, drift,
motion smoothness, dynamic degree, realism with --reference, and, where revisit pairs are known,
revisit error and retention (against chance) by lag and the effective context. Revisit pairs come
from ``<stem>.json`` (keys ``revisits``, and optionally ``camera``, ``width``, ``height``) and
``<stem>.revisit_masks.npz`` beside each video, as `cf world` writes them, or from one --revisits FILE
for every video. The sidecar's "fps", where present, overrides the file's (a gif cannot store 8 fps
exactly). A folder holding one video in several formats (same stem) is scored once. docs/scoring.md
has the formats and every definition.

Prints one JSON object with --json (else a short table): the backbone labels and methods, ``videos``
(one entry per scored file), ``aggregate`` and ``errors`` (unreadable files, by name; also on stderr).
Exit status 1 only if no video could be scored.
"""

COMMAND = ("score",)
HELP = "score videos on disk: consistency, drift, motion, revisit error and effective context"


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="video files or folders of them; key=value config overrides may follow the paths")
    p.add_argument("--backbone", default=None,
                   help="feature backbone (bench.backbone): pixels, imagenet, dino, dinov2, clip")
    p.add_argument("--background-backbone", default=None,
                   help="backbone of background consistency (bench.background_backbone; default: --backbone)")
    p.add_argument("--weights", default=None,
                   help="local weight file or folder for dino/dinov2/clip/LPIPS (bench.weights); "
                        "nothing is ever downloaded")
    p.add_argument("--revisits", default=None, metavar="FILE",
                   help="JSON with key 'revisits' ([t_first, t_revisit, lag] per pair) for every video, "
                        "instead of each video's <stem>.json; masks from FILE's <stem>.revisit_masks.npz")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="real videos to score realism against (Fréchet distance of bench.realism_backbone "
                        "features; the reference statistics are cached in DIR/.cf_realism)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _split(args) -> tuple[list, list]:
    """argparse gives the trailing key=value overrides to PATH...; take them back."""
    from pathlib import Path

    paths, overrides = [], list(args.overrides)
    for item in args.paths:
        (overrides if "=" in item and not Path(item).exists() else paths).append(item)
    shortcuts = {"bench.backbone": args.backbone, "bench.background_backbone": args.background_backbone,
                 "bench.weights": args.weights}
    for key, flag in shortcuts.items():
        if flag is not None:
            overrides.append(f"{key}={flag}")
    return paths, overrides


# One video saved in several formats (`cf world` writes world_000.mp4 beside world_000.gif) is scored once:
# the first of these suffixes wins; cf's gifs hold the exact pixels, its mp4s an enlarged H.264 copy.
PREFERRED = (".gif", ".webm", ".mkv", ".mp4", ".mov", ".avi")


def _videos(paths: list, errors: list, skipped: list) -> list:
    from pathlib import Path

    from cf.video import VIDEO_SUFFIXES

    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
            if not found:
                kinds = ", ".join(VIDEO_SUFFIXES)
                errors.append({"path": str(p), "error": f"no video files ({kinds}) in this folder"})
            by_stem: dict = {}
            for f in found:
                by_stem.setdefault(f.stem, []).append(f)
            rank = {s: i for i, s in enumerate(PREFERRED)}
            for group in by_stem.values():
                group.sort(key=lambda f: (rank.get(f.suffix.lower(), len(rank)), f.suffix))
                files.append(group[0])
                skipped += [{"path": str(f), "same_as": str(group[0])} for f in group[1:]]
        elif p.is_file():
            files.append(p)
        else:
            errors.append({"path": str(p), "error": "no such file or folder"})
    return files


def _camera(side: dict, hw: tuple[int, int]):
    """The sidecar's camera in the pixels of the video as read (cf world's mp4 is an enlarged copy)."""
    if side["camera"] is None:
        return None
    if side["size"] is None or tuple(side["size"]) == tuple(hw):
        return side["camera"]
    return side["camera"] * (hw[1] / side["size"][1])


def run(args, cfg) -> int:
    import json
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from cf.cli import config_from_args
    from cf.errors import CfError
    from cf.metrics.score import VideoScorer, read_sidecar
    from cf.video import read_video

    paths, args.overrides = _split(args)
    cfg = config_from_args(args)
    errors: list = []
    skipped: list = []
    files = _videos(paths, errors, skipped)
    if args.reference:
        ref = Path(args.reference).resolve()
        inside = [f for f in files if ref in f.resolve().parents]
        if inside:
            raise CfError(f"{inside[0]} is inside --reference {args.reference}: score generated videos "
                          f"against a reference set they are not part of")
    for d in skipped:
        print(f"cf score: {d['path']}: the same video as {d['same_as']} (one stem, scored once)",
              file=sys.stderr)
    shared = read_sidecar(args.revisits) if args.revisits else None
    if shared is not None and shared["revisits"] is None:
        raise CfError(f"--revisits {args.revisits!r} has no key 'revisits' "
                      f"(a list of [t_first, t_revisit, lag] per pair)")
    scorer = VideoScorer(cfg)
    if args.reference:
        from cf.metrics.realism import folder_reference

        ref_dir = Path(args.reference)
        if not ref_dir.is_dir():
            raise CfError(f"--reference {args.reference!r} is not a folder; expected a folder of real videos "
                          f"(mp4/webm/gif/...) to score realism against")
        scorer.attach_realism(folder_reference(ref_dir, backbone=cfg.bench.realism_backbone,
                                               weights=cfg.bench.weights, cache_dir=ref_dir / ".cf_realism"))
    videos = []
    for f in tqdm(files, desc="cf score", unit="video", file=sys.stderr, disable=len(files) < 2):
        try:
            frames, fps = read_video(f)
            sidecar = f.with_suffix(".json")
            own = read_sidecar(sidecar, missing_ok=True)
            rv = shared or own
            fps_source = "sidecar" if own["fps"] else "file"
            hw = tuple(frames.shape[1:3])
            result = scorer.score(frames, own["fps"] or fps, rv["revisits"], rv["masks"], _camera(rv, hw))
            videos.append({"path": str(f), "fps_source": fps_source, **result})
        except CfError as e:
            errors.append({"path": str(f), "error": str(e)})
    for e in errors:
        print(f"cf score: {e['path']}: {e['error']}", file=sys.stderr)
    result = {**scorer.describe(), "videos": videos, "aggregate": scorer.aggregate(), "errors": errors,
              "skipped_duplicates": skipped}
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        _table(result)
    return 0 if videos else 1


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(result: dict) -> None:
    cons = result["methods"]["consistency"]
    print(f"consistency: {'; '.join(cons.values())}; LPIPS: {result['lpips'] or result['lpips_note']}")
    heads = [c.replace("_consistency", "").replace("consistency_", "cons. ") for c in cons]
    print(f"{'video':<32} " + " ".join(f"{h[:12]:>12}" for h in heads) + f" {'first seg':>9} {'last seg':>9} "
          f"{'drift/s':>8} {'smooth':>7} {'moving':>7} {'revisit dB':>10} {'chance dB':>9} {'retention':>9} "
          f"{'context s':>9}")
    rows = [(r["path"], r) for r in result["videos"]]
    if result["aggregate"]:
        rows.append(("aggregate", result["aggregate"]))
    for name, r in rows:
        seg = r["first_frame_consistency"]
        rv = r["revisit"] or {}
        ctx = _fmt(r["effective_context_s"], ".2f")
        if r["effective_context_is_lower_bound"]:
            ctx = ">=" + ctx
        print(f"{name[-32:]:<32} " + " ".join(f"{_fmt(c['clips']):>12}" for c in r["consistency"]) +
              f" {_fmt(seg[0]['value']):>9} {_fmt(seg[-1]['value']):>9} "
              f"{_fmt(r['drift']['slope_per_s'], '+.4f'):>8} "
              f"{_fmt(r['motion_smoothness']):>7} {_fmt(r['moving_fraction'], '.2f'):>7} "
              f"{_fmt(rv.get('psnr'), '.1f'):>10} {_fmt(rv.get('chance_psnr'), '.1f'):>9} "
              f"{_fmt(rv.get('retention'), '.2f'):>9} {ctx:>9}")
    real = (result["aggregate"] or {}).get("realism")
    if real:
        where = real["reference"].get("path", "the reference")
        print(f"realism: Fréchet distance {real['fd']:.2f} ({real['backbone']} features of {real['frames']} "
              f"frames against {real['reference_frames']} of {where})")
