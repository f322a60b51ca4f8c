"""`cf` subcommands, one module each.

A module here defines:
    COMMAND = ("group", "name")  or ("name",)     # `cf group name ...` / `cf name ...`
    HELP = "one line"
    def add_arguments(parser): ...                 # optional: command-specific options
    def run(args, cfg) -> int | None: ...          # cfg is the validated config (or None if CONFIG=False)
    CONFIG = True                                  # optional: False for commands that take no config

Modules must import only the standard library at top level, so `cf --help` stays fast;
heavy imports (torch, mlflow) go inside `run`.
"""
