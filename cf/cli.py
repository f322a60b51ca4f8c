"""The `cf` command. Every subcommand takes options the same way:

    cf <command> [--preset NAME] [--method NAME] [--memory NAME] [--out DIR] [--seed N] [key=value ...]

What the user asked for or handed us that cannot be used (a bad config value, a damaged checkpoint,
a folder that cannot be written, a full disk, a store that cannot be opened) ends with one line,
`cf: error: ...`, and exit code 2; `cf --debug <command>` (or CF_DEBUG=1) also prints the traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import cf.commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(cf.commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"cf.commands.{info.name}")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config (the same for every command)")
    g.add_argument("--preset", default="tiny", help="experiments/presets/NAME.yaml (smoke, tiny, small, wan)")
    g.add_argument("--method", default=None, help="experiments/methods/NAME.yaml (context_forcing, ...)")
    g.add_argument("--memory", default=None, help="memory policy: shortcut for memory.policy=NAME")
    g.add_argument("--seed", type=int, default=None, help="shortcut for seed=N")
    g.add_argument("--out", default=None, help="output directory")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.depth=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cf", description="Context Forcing experiment suite")
    parser.add_argument("--debug", action="store_true", help="print the traceback behind an error message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for mod in _command_modules():
        path = mod.COMMAND
        if len(path) == 1:
            p = sub.add_parser(path[0], help=mod.HELP, description=mod.HELP)
        else:
            if path[0] not in groups:
                gp = sub.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = gp.add_subparsers(dest="subcommand", metavar="WHAT", required=True)
            p = groups[path[0]].add_parser(path[1], help=mod.HELP, description=mod.HELP)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
        if getattr(mod, "CONFIG", True):
            _add_common(p)
        p.set_defaults(_module=mod)
    return parser


def refuse_foreign_flags(mod, args: argparse.Namespace) -> None:
    """A flag that belongs to another --model than the one chosen (the command's `ONLY_FOR`) is an error
    naming the flag and its model, never silently ignored. Such flags default to None: given = not None."""
    only_for = getattr(mod, "ONLY_FOR", {})
    if not only_for:
        return
    from cf.errors import CfError

    flag = mod.MODEL_FLAG
    chosen = getattr(args, flag.lstrip("-").replace("-", "_"))
    for option, owner in only_for.items():
        if owner != chosen and getattr(args, option.lstrip("-").replace("-", "_")) is not None:
            raise CfError(f"{option} belongs to {flag} {owner}, but this run is {flag} {chosen}; "
                          f"drop {option} or pass {flag} {owner}")


def config_from_args(args: argparse.Namespace):
    from cf.config import load_config

    overrides = list(args.overrides)
    if args.memory is not None:
        overrides.append(f"memory.policy={args.memory}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.preset, args.method, overrides, out=args.out)


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error that is the user's to fix (None: a bug, keep the traceback)."""
    from cf.errors import CfError
    from cf.faults import DiskFullError, disk_full_message, is_disk_full, one_line

    if is_disk_full(e):
        return one_line(str(e)) if isinstance(e, DiskFullError) else disk_full_message(e)
    if isinstance(e, CfError):  # ConfigError and UnknownNameError are CfErrors too
        return one_line(str(e))
    if isinstance(e, OSError) and e.filename is not None:  # a path we were given or write to
        return f"cannot use {str(e.filename)!r}: {e.strerror or e}; check the path and its permissions"
    if type(e).__module__.startswith("mlflow"):
        return f"the MLflow store answered: {one_line(str(e))}; check MLFLOW_TRACKING_URI or tracking.uri"
    return None


def main(argv: list[str] | None = None) -> int:
    import os
    import traceback

    args = build_parser().parse_args(argv)
    mod = args._module
    debug = args.debug or os.environ.get("CF_DEBUG", "") not in ("", "0")
    try:
        refuse_foreign_flags(mod, args)
        cfg = config_from_args(args) if getattr(mod, "CONFIG", True) else None
        rc = mod.run(args, cfg)
    except KeyboardInterrupt:
        print("cf: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"cf: error: {message}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
