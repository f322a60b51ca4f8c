"""`cf bench consistency`: long videos per method x memory policy, scored -> tables, plots, MLflow.

Benchmarks every method in ``bench.methods`` x policy in ``bench.policies`` (``--method`` / ``--memory``
narrow it to one), each with its generator from ``<runs>/<method>-<memory>-seed<seed>/generator.safetensors``
(``--runs``, default ``runs/<preset>``), or random weights with ``--untrained``. Writes into ``--out``
(default ``<runs>/bench``, ``<runs>/bench-untrained`` with --untrained) what `cf.bench.consistency`
describes: results/*.csv, results/*.md tables, plots/*.png, videos/, and one MLflow run.

    cf bench consistency --preset tiny bench.methods=[self_forcing,longlive,context_forcing]
    cf bench consistency --preset smoke --untrained bench.policies=[sliding,slowfast]
    cf bench consistency --preset tiny --image-dir photos/ bench.seeds=[0]   # long rollouts from pictures
"""

COMMAND = ("bench", "consistency")
HELP = "generate long videos per method x memory policy, score them -> tables, plots, videos, MLflow"


def add_arguments(p) -> None:
    p.add_argument(
        "--runs",
        default=None,
        metavar="DIR",
        help="folder of <method>-<memory>-seed<seed>/generator.safetensors (default runs/<preset>)",
    )
    p.add_argument(
        "--image-dir",
        default=None,
        metavar="DIR",
        help="start every video from each PNG/JPEG in DIR (resized to cover the frame, centre-cropped) "
             "instead of the world's own frames, with each seed of bench.seeds",
    )
    p.add_argument(
        "--untrained",
        action="store_true",
        help="random weights instead of trained generators (labelled 'untrained' everywhere)",
    )


def run(args, cfg) -> int:
    from pathlib import Path

    from cf.bench.consistency import plan_entries, run_consistency
    from cf.bench.tables import table2

    runs = Path(args.runs) if args.runs else Path("runs") / cfg.preset
    out = Path(args.out) if args.out else runs / ("bench-untrained" if args.untrained else "bench")
    methods = [args.method] if args.method else list(cfg.bench.methods)
    policies = [args.memory] if args.memory else list(cfg.bench.policies)
    overrides = [*args.overrides, *([f"seed={args.seed}"] if args.seed is not None else [])]
    images = None
    if args.image_dir is not None:  # every picture read and checked before any generator loads
        from cf.generation import load_picture
        from cf.image import image_files

        images = image_files(args.image_dir)
        for path in images:
            load_picture(cfg, path, "--image-dir")
    entries = plan_entries(cfg.preset, methods, policies, overrides, runs, untrained=args.untrained)
    result = run_consistency(cfg, entries, out, images=images)
    print(table2(result.runs), end="")
    print(f"wrote {len(result.files)} files to {out} (tables in {out / 'results'}, plots in {out / 'plots'})")
    return 0
