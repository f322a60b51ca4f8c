"""Faults: telling a full disk from a bug, one-line messages, and failpoints for the fault tests.

A full disk reaches us in many shapes: `OSError(ENOSPC)` from Python, `av.error.OSError` from
PyAV, a safetensors `IoError(... StorageFull ...)` string, sqlite's "database or disk is full"
inside an MlflowException. `is_disk_full` recognises all of them (in the exception or anything it
was raised from), so the CLI can stop with one line and the advice to free space and rerun: every
write is atomic and every stage resumes, so nothing is lost.

Failpoints. `failpoint(name)` marks a point where a kill or a full disk is worth testing (stage
boundaries, mid-save). It does nothing unless `$CF_FAILPOINT` names it:

    CF_FAILPOINT=stage.start:cdmd1            # SIGKILL this process the first time it gets there
    CF_FAILPOINT=ckpt.tmp_written@2           # ... the second time
    CF_FAILPOINT=ckpt.write:enospc            # raise OSError(ENOSPC) there instead (a full disk)

`name` is matched as a glob (`stage.ran:*`). The cost when unset is one environment lookup.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import signal
from collections.abc import Iterator

from cf.errors import CfError

FAILPOINT_ENV = "CF_FAILPOINT"
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded",
                   "storagefull")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_hits: dict[str, int] = {}


class DiskFullError(CfError):
    """The disk filled up mid-run; the message says where and that a rerun resumes."""


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException) -> bool:
    """True if `e` (or an exception it was raised from) says the disk or the quota is full."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(x).lower() for t in _DISK_FULL_TEXT):
            return True
    return False


def disk_full_message(e: BaseException, path: str | os.PathLike | None = None) -> str:
    """'no space left on device while writing X; free space ... and rerun' for a disk-full `e`."""
    where = path or next((x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), None)
    what = f" while writing {str(where)!r}" if where else f" ({one_line(str(e))})"
    return (
        f"no space left on device{what}; free some space and run the same command again: finished "
        "work is kept (every file is written atomically) and a stopped stage resumes from its last checkpoint"
    )


def one_line(text: str) -> str:
    """`text` without terminal colour codes, its lines joined: what the CLI prints after `cf: error:`."""
    return " ".join(line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip())


def failpoint(name: str) -> None:
    """Kill this process (or raise ENOSPC) here if `$CF_FAILPOINT` asks for `name` (see module doc)."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec:
        return
    enospc = spec.endswith(":enospc")
    pattern, _, nth = spec.removesuffix(":enospc").partition("@")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    if spec not in _hits:  # count hits of this spec only (a test process may set several in turn)
        _hits.clear()
    _hits[spec] = _hits.get(spec, 0) + 1
    if _hits[spec] != int(nth or 1):
        return
    if enospc:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<failpoint {name}>")
    os.kill(os.getpid(), signal.SIGKILL)
