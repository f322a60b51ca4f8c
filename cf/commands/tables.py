"""`cf tables`: results/<preset>/<ablation>.md + .csv from the MLflow pipeline runs (see cf/results.py)."""

COMMAND = ("tables",)
HELP = "regenerate results/<preset>/<ablation>.md and .csv from the MLflow pipeline runs"


def add_arguments(p) -> None:
    p.add_argument(
        "--ablation",
        action="append",
        default=None,
        metavar="NAME",
        help="only this ablation (repeatable; 'pipelines' = runs outside a grid); default: all",
    )
    p.add_argument("--results", default=None, metavar="DIR", help="output folder (default: results/)")


def run(args, cfg) -> int:
    from cf import tracking
    from cf.results import RESULTS, write_tables

    written = write_tables(cfg, ablations=args.ablation, out=args.results or RESULTS)
    if not written:
        print(
            f"no finished pipeline runs in {tracking.tracking_uri(cfg)} (experiment "
            f"{cfg.tracking.experiment!r}) yet: run `make ablate` first"
        )
        return 0
    for path in written:
        print(path)
    return 0
