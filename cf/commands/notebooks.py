"""`cf notebooks`: execute notebooks/*.ipynb headless (nbclient) against the project's MLflow store.

The notebooks write their figures into `results/figures/` (or --figures); the executed copies, with
their outputs, go to `<out>/notebooks/` so the committed notebooks stay free of outputs. The kernel
gets the store this config logs to (`MLFLOW_TRACKING_URI`, `CF_EXPERIMENT`) and the preset (`CF_PRESET`).
"""

COMMAND = ("notebooks",)
HELP = "execute notebooks/*.ipynb headless; figures -> results/figures/, executed copies -> <out>/notebooks/"


def add_arguments(p) -> None:
    p.add_argument(
        "--notebook",
        action="append",
        default=None,
        metavar="PATH",
        help="run only this notebook (repeatable); default: every notebooks/*.ipynb",
    )
    p.add_argument(
        "--figures", default=None, metavar="DIR", help="where the figures go (default: results/figures)"
    )
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")


def execute(path, out_dir, env: dict[str, str], timeout: int = 600):
    """Run one notebook in a fresh kernel (cwd: the project root); returns the executed copy's path."""
    import tempfile
    from pathlib import Path

    import nbformat
    from jupyter_client import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from cf.config.load import ROOT
    from cf.errors import CfError
    from cf.utils import atomic_path

    path = Path(path)
    book = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="cf-kernel-") as sockets:
        # IPC sockets in a private folder: nothing listens on a TCP port, even on 127.0.0.1
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(sockets) / "kernel"))
        client = NotebookClient(book, km=km, timeout=timeout, resources={"metadata": {"path": str(ROOT)}})
        try:
            client.execute(env=env)
        except CellExecutionError as e:
            raise CfError(f"notebook {path} failed: {str(e).strip().splitlines()[-1]}") from e
        finally:
            if km.has_kernel:  # nbclient leaves a kernel it did not create running
                km.shutdown_kernel(now=True)
    dest = Path(out_dir) / path.name
    with atomic_path(dest) as tmp:
        nbformat.write(book, tmp)
    return dest


def run(args, cfg) -> int:
    import os
    from pathlib import Path

    from cf import tracking
    from cf.config.load import ROOT
    from cf.errors import CfError
    from cf.results import RESULTS

    paths = (
        [Path(p) for p in args.notebook] if args.notebook else sorted((ROOT / "notebooks").glob("*.ipynb"))
    )
    if not paths:
        raise CfError(f"no notebooks found in {ROOT / 'notebooks'}")
    for p in paths:
        if not p.is_file():
            raise CfError(f"notebook {str(p)!r} does not exist; pass a path to an .ipynb file")
    figures = Path(args.figures).resolve() if args.figures else RESULTS / "figures"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg),
        "CF_PRESET": cfg.preset,
        "CF_EXPERIMENT": cfg.tracking.experiment,
        "CF_FIGURES": str(figures),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    out = Path(cfg.out) / "notebooks"
    for p in paths:
        print(f"executing {p.name} ...", flush=True)
        print(f"  -> {execute(p, out, env, args.timeout)}", flush=True)
    print(f"figures in {figures}")
    return 0
