"""`cf config`: print the resolved config (defaults <- preset <- method <- overrides)."""

COMMAND = ("config",)
HELP = "print the resolved, validated config as YAML"


def run(args, cfg) -> int:
    from cf.config import config_hash, to_yaml

    print(f"# preset={cfg.preset} method={cfg.method} hash={config_hash(cfg)}")
    print(to_yaml(cfg), end="")
    return 0
