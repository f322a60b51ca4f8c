"""The `cf` command. Every subcommand takes options the same way:

    cf <command> [--preset NAME] [--method NAME] [--memory NAME] [--out DIR] [--seed N] [key=value ...]
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


def config_from_args(args: argparse.Namespace):
    from cf.config import load_config

    overrides = list(args.overrides)
    if args.memory is not None:
        overrides.append(f"memory.policy={args.memory}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.preset, args.method, overrides, out=args.out)


def main(argv: list[str] | None = None) -> int:
    from cf.config import ConfigError
    from cf.errors import CfError
    from cf.registry import UnknownNameError

    args = build_parser().parse_args(argv)
    mod = args._module
    try:
        cfg = config_from_args(args) if getattr(mod, "CONFIG", True) else None
        rc = mod.run(args, cfg)
    except (ConfigError, UnknownNameError, CfError) as e:
        print(f"cf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cf: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
