"""Checking the files and folders the CLI is handed, before any work starts.

    check_writable_dir(out, "--out")        # create it and prove a file can be written there
    check_weights(path, "--ckpt")            # a .safetensors or torch checkpoint that really is one
    damage(path)                             # None, or why a checkpoint / weights file is damaged (cheap)
    digest(path)                             # sha256 of a file's content

Every failure is a `CfError` naming the file, what was expected and the fix, so the CLI prints one
line. `damage` reads the file's own structure only (the safetensors header against the file size,
the CRC of every member of a torch zip archive); `check_weights` also unpickles a torch checkpoint
with weights_only=True (memory-mapped, so it costs little even for a large file).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

from cf.errors import CfError

EXPECTED = "a .safetensors file or a torch/Lightning checkpoint (.ckpt) holding tensors"
_SAFETENSORS_HEADER_MAX = 100 * 2**20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def digest(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create `path` (and its parents) and write and remove a probe file in it; CfError if impossible."""
    path = Path(path)
    fix = f"pass {what} a folder you can write to"
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise CfError(f"cannot create the output folder {str(path)!r} ({what}): {str(parent)!r} is a "
                          f"file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cf-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise CfError(
            f"cannot create or write the output folder {str(path)!r} ({what}): {reason}; {fix}"
        ) from None
    return path


def _safetensors_damage(path: Path, size: int) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it is {size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(size - 8, _SAFETENSORS_HEADER_MAX):
            return (f"its header length field says {n} bytes but the file is {size} bytes "
                    "(a damaged header, or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        return "its header is not valid JSON (a damaged header)"
    if not isinstance(header, dict):
        return "its header is not a JSON object (a damaged header)"
    data = size - 8 - n
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = t["data_offsets"]
            count = 1
            for d in t["shape"]:
                count *= int(d)
            width = _DTYPE_BYTES.get(t["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"its header entry for {name!r} is malformed (a damaged header)"
        if not 0 <= b <= e or (width is not None and e - b != count * width):
            return f"its header entry for {name!r} is inconsistent (a damaged header)"
        end = max(end, e)
    if end > data:
        return f"it is truncated: {size} bytes, but its header says the tensors need {8 + n + end}"
    return None


def _zip_damage(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any("/code/" in n or n.endswith("constants.pkl") for n in names):
                return ("it is a TorchScript archive (a compiled program, read with torch.jit.load), not a "
                        "checkpoint of weights; save its state_dict() with torch.save or safetensors")
            if not any(n.endswith("data.pkl") for n in names):
                return "it is a zip archive but not a torch checkpoint (no data.pkl inside)"
            bad = z.testzip()
    except zipfile.BadZipFile:
        return "it is truncated or damaged (its zip directory cannot be read)"
    except (OSError, EOFError, zipfile.LargeZipFile) as e:
        return f"it cannot be read ({e})"
    if bad is not None:
        return f"it is damaged (the CRC of its member {bad!r} does not match)"
    return None


def kind(path: str | os.PathLike) -> str:
    """What the file's first bytes say it is: zip (torch), safetensors, pickle, text, empty or unknown."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) > 9 and head[8:9] == b"{" and head[9:10] in (b'"', b"}"):
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "text"
    return "unknown"


def damage(path: str | os.PathLike) -> str | None:
    """Why the weights / checkpoint file at `path` is unusable, from its structure alone; None if it
    looks whole (a pickle, torch's legacy format, is left to torch.load)."""
    path = Path(path)
    if not path.is_file():
        return "it does not exist" if not path.exists() else "it is not a file"
    size = path.stat().st_size
    k = kind(path)
    if k == "zip":
        return _zip_damage(path)
    if k == "safetensors" or (path.suffix == ".safetensors" and k in ("unknown", "pickle")):
        return _safetensors_damage(path, size)
    if k == "empty":
        return "it is empty (0 bytes)"
    if k == "text":
        with open(path, "rb") as f:
            start = f.read(24).decode("ascii", errors="replace")
        return f"it is a text file (it starts with {start!r})"
    if k == "unknown":
        return "it is neither a safetensors file nor a torch checkpoint (unknown format)"
    return None


def _unpickle_problem(path: Path, mmap: bool) -> str | None:
    import re
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign or unsafe files
        from cf.faults import one_line

        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        detail = f"an object of type {found[1]}" if found else one_line(str(e))[:200] or type(e).__name__
        return (f"it holds Python objects that torch.load(weights_only=True) refuses to unpickle ({detail}); "
                "only tensors and plain values are read, so re-save it from its state_dict()")
    return None


def check_weights(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """CfError unless `path` is a whole safetensors file or a torch checkpoint weights_only can read."""
    path = Path(path)
    if not path.exists():
        raise CfError(f"{what} {str(path)!r} does not exist; pass the path of {EXPECTED}")
    problem = damage(path)
    k = kind(path) if path.is_file() else None
    if problem is None and (path.suffix == ".safetensors") != (k == "safetensors"):
        problem = (f"its content is a {k} file but its name says {path.suffix or 'no suffix'} (it is read by "
                   "its suffix); rename it to .safetensors or .ckpt after what it holds")
    if problem is None and k in ("zip", "pickle"):
        problem = _unpickle_problem(path, mmap=k == "zip")
    if problem is not None:
        raise CfError(f"{what} {str(path)!r} cannot be used: {problem}; expected {EXPECTED}")
    return path
