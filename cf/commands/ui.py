"""`cf ui`: the MLflow UI over the store cf logs to, bound to 127.0.0.1 (`make ui`)."""

COMMAND = ("ui",)
HELP = "serve the MLflow UI for the project's runs on 127.0.0.1 and print its address"


def add_arguments(p) -> None:
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")


def ui_command(uri: str, port: int) -> list[str]:
    """The `mlflow ui` command line for store `uri` (a sqlite store keeps artifacts in its mlruns/)."""
    import sys

    from cf.store import artifact_location

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    artifacts = artifact_location(uri)
    if artifacts is not None:
        cmd += ["--default-artifact-root", artifacts]
    return cmd


def run(args, cfg) -> int:
    import os

    from cf import tracking
    from cf.errors import CfError

    if not 0 < args.port < 65536:
        raise CfError(f"--port {args.port} is not a TCP port; use 1..65535, e.g. --port 5000")
    uri = tracking.tracking_uri(cfg)
    print(f"MLflow UI: http://127.0.0.1:{args.port}  (store {uri}; Ctrl-C stops it)", flush=True)
    cmd = ui_command(uri, args.port)
    os.execv(cmd[0], cmd)  # the server takes this process over: Ctrl-C and kill reach it directly
    return 0  # not reached
