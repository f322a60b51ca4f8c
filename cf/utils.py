"""Small shared helpers: atomic writes, seeding, device and dtype selection, provenance."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# atomic_path's temporary files: `.<name>.partial-<random><suffix>` beside the target (older versions
# wrote `.<name>.<random><suffix>`); what a killed write leaves behind, and what `partial_files` finds.
_PARTIAL = re.compile(r"^\.(?P<target>.+?)\.(?:partial-)?[A-Za-z0-9_]{8}(?P<suffix>\.[^.]+)$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A crash mid-write therefore never leaves a truncated result or checkpoint behind. `fsync`
    flushes the file to the disk before the rename, so even a power loss cannot leave `path`
    half-written (checkpoints and cache markers ask for it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        if fsync:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except Exception as e:
        from cf.faults import DiskFullError, disk_full_message, is_disk_full

        if is_disk_full(e) and not isinstance(e, DiskFullError):  # name the file the disk was full for
            raise DiskFullError(disk_full_message(e, path)) from e
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def partial_target(name: str) -> str | None:
    """The file name an atomic write's temporary file `name` stands for, or None if it is not one."""
    m = _PARTIAL.match(name)
    if m is None:
        return None
    target, suffix = m["target"], m["suffix"]
    return target if target.endswith(suffix) or suffix == ".tmp" else None


def partial_files(folder: str | os.PathLike) -> list[Path]:
    """Temporary files of interrupted atomic writes anywhere under `folder`."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob(".*") if p.is_file() and partial_target(p.name) is not None)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, fsync: bool = False) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(spec: str = "auto"):
    """'auto' -> cuda if available else cpu; anything else is passed to torch.device (checked)."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from cf.errors import CfError

        raise CfError(f"device={spec!r} was asked for but CUDA is not available here; use device=cpu or auto")
    return dev


def compute_dtype(spec: str, device) -> Any:
    """The dtype the model computes in: 'auto' is bf16 on CUDA (autocast) and fp32 on CPU."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    if spec == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return table[spec]


def git_sha(short: bool = False) -> str:
    """The commit of the working tree ('unknown' outside git), '+dirty' when it has changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    sha = sha[:10] if short else sha
    return sha + ("+dirty" if dirty else "")


def set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)
