"""`cf ablate`: the whole method end to end (teacher -> ERFT -> student -> CDMD 1 -> 2 -> bench),
for one config or for every variant of an ablation grid (`--ablation ablations/NAME.yaml`).

Stages are cached by the hash of the config they read under `<out>/cache/`, so a second memory
policy reuses the teacher; a killed run resumes where it stopped. See cf/pipeline.py.
"""

COMMAND = ("ablate",)
HELP = "run the pipeline end to end (cached, resumable); --ablation FILE runs a grid"


def add_arguments(p) -> None:
    p.add_argument(
        "--ablation",
        default=None,
        metavar="FILE",
        help="an ablation grid: ablations/NAME.yaml (or just NAME); runs every variant",
    )
    p.add_argument(
        "--variants",
        default=None,
        metavar="A,B",
        help="with --ablation: run only these variants, in this order (e.g. to split a grid in two)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print each stage's cache directory and state (done / partial / to do); run nothing",
    )


def _grid_overrides(args) -> list[str]:
    """The command line's overrides as `cf.cli.config_from_args` builds them."""
    overrides = list(args.overrides)
    if args.memory is not None:
        overrides.append(f"memory.policy={args.memory}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return overrides


def print_plan(cfg, title: str, dest=None) -> None:
    """Each stage's state, its cache entry verified as a run would (read-only: nothing is moved)."""
    import json

    from cf import stage_cache
    from cf.pipeline import cache_root, past_durations, plan

    est = past_durations(cache_root(cfg), cfg.preset)
    print(f"{title}:")
    markers: dict[str, dict] = {}
    for ps in plan(cfg):
        why = ""
        if ps.done:
            try:
                markers[ps.name] = json.loads(ps.marker.read_text())
                bad = stage_cache.problem(ps, markers[ps.name], markers)
            except (OSError, ValueError) as e:
                bad = ("damaged", f"{ps.marker}: {e}")
            state = "done" if bad is None else f"{bad[0]}, will redo"
            why = "" if bad is None else f" ({bad[1]})"
        else:
            state = "partial" if (ps.dir / ps.name / "last.ckpt").is_file() else "to do"
        took = f" (~{est[ps.name] / 60:.1f} min)" if ps.name in est and state != "done" else ""
        print(f"  {ps.name:<13} {state:<8} {ps.dir}{took}{why}")
    if dest is not None and (dest / "pipeline.json").is_file():
        try:
            doc = json.loads((dest / "pipeline.json").read_text())
            bad = stage_cache.verify_published(dest, doc) if doc.get("complete") else "not finished"
        except (OSError, ValueError) as e:
            bad = str(e)
        print(f"  {'published':<13} {'ok' if bad is None else 'will publish again'} {dest}"
              + ("" if bad is None else f" ({bad})"))


def run(args, cfg) -> int:
    from cf.filecheck import check_writable_dir
    from cf.pipeline import canonical_label, run_dir, run_pipeline

    if not args.plan:  # before any work: a folder that cannot be written fails now, not after training
        check_writable_dir(cfg.out, "--out" if args.out else "out")
    if args.ablation is None:
        label = canonical_label(cfg)
        if args.plan:
            print_plan(cfg, f"pipeline -> {run_dir(cfg, label)}", run_dir(cfg, label))
            return 0
        res = run_pipeline(cfg, label=label)
        print(f"done: {res.run_dir} (trained: {', '.join(res.ran) or 'nothing, all cached'})")
        return 0

    from cf.ablation import load_ablation, run_ablation, select_variants, variant_configs

    ab = load_ablation(args.ablation)
    if args.variants is not None:
        ab = select_variants(ab, args.variants.split(","))
    configs = variant_configs(ab, args.preset, args.method, _grid_overrides(args), out=args.out)
    if args.plan:
        for variant, vcfg in configs.items():
            label = None if canonical_label(vcfg) is None else f"{ab.name}-{variant}"
            print_plan(vcfg, f"{ab.name} / {variant} -> {run_dir(vcfg, label)}", run_dir(vcfg, label))
        return 0
    results = run_ablation(ab, configs)
    for variant, res in results.items():
        print(
            f"{ab.name} / {variant}: {res.run_dir} (trained: {', '.join(res.ran) or 'nothing, all cached'})"
        )
    if cfg.tracking.enabled:
        from cf.results import write_tables

        for path in write_tables(cfg, ablations=[ab.name]):
            print(f"table: {path}")
    return 0
