"""`cf score PATH... [--backbone NAME] [--json] [--revisits FILE] [--weights PATH] [key=value ...]`

Scores videos on disk (files, or folders of mp4/webm/gif/...) with every metric of `cf.metrics`:
subject/background consistency, first-frame consistency per segment, drift, motion smoothness,
dynamic degree, and, where revisit pairs are known, revisit error by lag and effective context.
Revisit pairs come from ``<stem>.json`` (key ``revisits``) and ``<stem>.revisit_masks.npz`` beside
each video, as `cf world` writes them, or from one --revisits FILE for every video. The sidecar's
"fps", where present, overrides the file's (a gif cannot store 8 fps exactly).

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


def _videos(paths: list, errors: list) -> list:
    from pathlib import Path

    from cf.video import VIDEO_SUFFIXES

    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
            if not found:
                kinds = ", ".join(VIDEO_SUFFIXES)
                errors.append({"path": str(p), "error": f"no video files ({kinds}) in this folder"})
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append({"path": str(p), "error": "no such file or folder"})
    return files


def run(args, cfg) -> int:
    import json
    import sys

    from tqdm import tqdm

    from cf.cli import config_from_args
    from cf.errors import CfError
    from cf.metrics.score import VideoScorer, read_sidecar
    from cf.video import read_video

    paths, args.overrides = _split(args)
    cfg = config_from_args(args)
    errors: list = []
    files = _videos(paths, errors)
    shared = read_sidecar(args.revisits) if args.revisits else None
    if shared is not None and shared["revisits"] is None:
        raise CfError(f"--revisits {args.revisits!r} has no key 'revisits' "
                      f"(a list of [t_first, t_revisit, lag] per pair)")
    scorer = VideoScorer(cfg)
    videos = []
    for f in tqdm(files, desc="cf score", unit="video", file=sys.stderr, disable=len(files) < 2):
        try:
            frames, fps = read_video(f)
            sidecar = f.with_suffix(".json")
            own = read_sidecar(sidecar, missing_ok=True)
            rv = shared or own
            fps_source = "sidecar" if own["fps"] else "file"
            result = scorer.score(frames, own["fps"] or fps, rv["revisits"], rv["masks"])
            videos.append({"path": str(f), "fps_source": fps_source, **result})
        except CfError as e:
            errors.append({"path": str(f), "error": str(e)})
    for e in errors:
        print(f"cf score: {e['path']}: {e['error']}", file=sys.stderr)
    result = {**scorer.describe(), "videos": videos, "aggregate": scorer.aggregate(), "errors": errors}
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        _table(result)
    return 0 if videos else 1


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(result: dict) -> None:
    print(f"backbone: {result['backbone_label']}; background: {result['background_backbone_label']}; "
          f"LPIPS: {result['lpips'] or result['lpips_note']}")
    print(f"{'video':<32} {'subject':>8} {'backgr.':>8} {'first seg':>9} {'last seg':>9} {'drift/s':>8} "
          f"{'smooth':>7} {'dynamic':>7} {'revisit dB':>10} {'context s':>9}")
    rows = [(r["path"], r) for r in result["videos"]]
    if result["aggregate"]:
        rows.append(("aggregate", result["aggregate"]))
    for name, r in rows:
        seg = r["first_frame_consistency"]
        rv = r["revisit"]
        print(f"{name[-32:]:<32} {_fmt(r['subject_consistency']):>8} {_fmt(r['background_consistency']):>8} "
              f"{_fmt(seg[0]['value']):>9} {_fmt(seg[-1]['value']):>9} "
              f"{_fmt(r['drift']['slope_per_s'], '+.4f'):>8} "
              f"{_fmt(r['motion_smoothness']):>7} {_fmt(r['dynamic_degree'], '.2f'):>7} "
              f"{_fmt(rv['psnr'] if rv else None, '.1f'):>10} {_fmt(r['effective_context_s'], '.2f'):>9}")
