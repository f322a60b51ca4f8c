"""The verified stage cache: what a finished stage wrote, checked before it is reused or published.

When a stage finishes, its `done.json` records every file of its entry (`files`: relative path ->
size and sha256) and the checkpoint digest of each stage it read (`inputs`). Before the entry is
reused:

- every recorded file must exist with its recorded size (cheap: a stat per file);
- the files a later stage or the run folder reads (the checkpoint, `*.ckpt`, `*.safetensors`, what
  the stage publishes) must also hash to their recorded sha256;
- each input's checkpoint must still be the one the stage was trained from (an upstream stage that
  was redone since makes this entry stale).

An entry that fails is never deleted: it is renamed `<entry>.damaged-<time>` (or `.stale-<time>`)
and the stage is redone; a checkpoint in it that still verifies is copied into the new entry, so a
damaged sample video costs a re-evaluation, not a retraining. Entries written before records existed
(no `files` in done.json) are checked by structure (`cf.filecheck.damage`) and then recorded.

Publishing copies each stage's published files into the run folder and checks every copy against the
cache record; `pipeline.json` keeps the published files' records, so the run folder is verified the
same way (`verify_published`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cf.errors import CfError
from cf.filecheck import damage, digest
from cf.utils import atomic_path, partial_files, partial_target

if TYPE_CHECKING:
    from cf.stages import PlannedStage

# The entry's own bookkeeping, not the stage's output.
BOOKKEEPING = frozenset({".lock", "done.json", "stage.json", "mlflow_run.json"})
HASHED_SUFFIXES = (".ckpt", ".safetensors")


def record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": digest(path)}


def entry_files(entry: Path) -> list[str]:
    """The stage's output files in `entry` (relative paths; bookkeeping and temporary files left out)."""
    out = []
    for p in sorted(entry.rglob("*")):
        rel = p.relative_to(entry)
        if p.is_file() and str(rel) not in BOOKKEEPING and partial_target(p.name) is None:
            out.append(rel.as_posix())
    return out


def _under(rel: str, roots: set[str]) -> bool:
    return any(rel == r or rel.startswith(r.rstrip("/") + "/") for r in roots)


def read_set(ps: PlannedStage, marker: dict) -> set[str]:
    """Relative paths (files or folders) whose content is hashed on reuse: what later stages and the
    run folder read."""
    return {str(marker.get("checkpoint", "")), *(src for src, _ in ps.stage.publish)} - {""}


def hashed(rel: str, roots: set[str]) -> bool:
    return rel.endswith(HASHED_SUFFIXES) or _under(rel, roots)


def checkpoint_digest(marker: dict) -> str | None:
    """One digest for the checkpoint a stage hands on (a file, or a folder's files); None if unrecorded."""
    files, ckpt = marker.get("files"), str(marker.get("checkpoint", ""))
    if not files or not ckpt:
        return None
    if ckpt in files:
        return files[ckpt]["sha256"]
    inside = sorted(f"{k}:{v['sha256']}" for k, v in files.items() if _under(k, {ckpt}))
    if not inside:
        return None
    import hashlib

    return hashlib.sha256("\n".join(inside).encode()).hexdigest()


def finish_marker(ps: PlannedStage, marker: dict, upstream: dict[str, dict]) -> dict:
    """`marker` with the entry's file records and the digests of the checkpoints it read."""
    marker["files"] = {rel: record(ps.dir / rel) for rel in entry_files(ps.dir)}
    marker["inputs"] = {
        role: {"stage": up, "checkpoint_sha256": checkpoint_digest(upstream[up])}
        for role, up in sorted(ps.inputs.items())
    }
    return marker


def problem(ps: PlannedStage, marker: dict, upstream: dict[str, dict]) -> tuple[str, str] | None:
    """None if the entry can be reused, else (kind, why): kind 'damaged' or 'stale', why names the file."""
    files = marker.get("files")
    roots = read_set(ps, marker)
    if files is None:  # written before records existed: check what can be checked by structure
        for rel in entry_files(ps.dir):
            if hashed(rel, roots) and rel.endswith(HASHED_SUFFIXES) and (why := damage(ps.dir / rel)):
                return "damaged", f"{ps.dir / rel}: {why}"
        for rel in roots:
            if not (ps.dir / rel).exists():
                return "damaged", f"{ps.dir / rel} is missing"
    else:
        for rel, rec in files.items():
            path = ps.dir / rel
            if not path.is_file():
                return "damaged", f"{path} is missing"
            if (size := path.stat().st_size) != rec["size"]:
                return "damaged", f"{path} is {size} bytes, {rec['size']} when the stage finished"
        for rel, rec in files.items():
            if hashed(rel, roots) and digest(ps.dir / rel) != rec["sha256"]:
                return "damaged", f"{ps.dir / rel} does not hash to what the stage wrote (its bytes changed)"
    for role, rec in (marker.get("inputs") or {}).items():
        up = upstream.get(rec.get("stage", ""))
        now = checkpoint_digest(up) if up is not None else None
        if rec.get("checkpoint_sha256") and now and now != rec["checkpoint_sha256"]:
            return "stale", f"its {role} checkpoint from stage {rec['stage']} was redone since it was trained"
    return None


def adopt(ps: PlannedStage, marker: dict, upstream: dict[str, dict]) -> bool:
    """Record files and inputs in an entry written before records existed; True if it was changed."""
    if marker.get("files") is not None:
        return False
    finish_marker(ps, marker, upstream)
    return True


def move_aside(ps: PlannedStage, kind: str) -> Path:
    """Move the entry's contents into `<entry>.<kind>-<time>`; returns that folder.

    The entry itself stays, with its lock file (the lock this process holds, and other processes may
    wait on, keeps its identity); `done.json` goes first, so an interruption leaves an unfinished entry.
    """
    aside = ps.dir.with_name(f"{ps.dir.name}.{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name.rsplit('~', 1)[0]}~{n}")
        n += 1
    aside.mkdir()
    for child in sorted(ps.dir.iterdir(), key=lambda p: p.name != "done.json"):
        if child.name != ".lock":
            child.rename(aside / child.name)
    return aside


def keep_good_checkpoint(ps: PlannedStage, aside: Path, marker: dict) -> Path | None:
    """Copy the aside entry's `<stage>/last.ckpt` into the new entry if it hashes to its record."""
    rel = f"{ps.name}/last.ckpt"
    rec = (marker.get("files") or {}).get(rel)
    src = aside / rel
    if rec is None or not src.is_file() or src.stat().st_size != rec["size"] or digest(src) != rec["sha256"]:
        return None
    dst = ps.dir / rel
    with atomic_path(dst, fsync=True) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def clean_partials(entry: Path) -> list[Path]:
    """Remove what interrupted atomic writes left in `entry` (a checkpoint's are left to
    `cf.train.recovery.recover_checkpoint`, which may resume from a complete one)."""
    gone = [p for p in partial_files(entry) if not p.name.endswith(".ckpt")]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


# --- the run folder ------------------------------------------------------------------------------


def publish(planned: list[PlannedStage], markers: dict[str, dict], dest: Path) -> dict[str, dict]:
    """Copy each stage's published files into `dest` (later stages win), check every copy against the
    cache's record, and return the published files' records (relative to `dest`)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied: dict[str, tuple[PlannedStage, str]] = {}
    for ps in planned:
        for src, dst in ps.stage.publish:
            if not (ps.dir / src).exists():
                raise CfError(
                    f"stage {ps.name} finished but did not write {str(ps.dir / src)!r}, which the "
                    f"pipeline publishes as {dst}; check that stage's output"
                )
            copied[dst] = (ps, src)
    for p in partial_files(dest):
        p.unlink(missing_ok=True)
    records: dict[str, dict] = {}
    for dst, (ps, src) in copied.items():
        path, target = ps.dir / src, dest / dst
        if path.is_dir():
            tmp = dest / f".{dst}.partial-dir"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            pairs = [(f"{src}/{p.relative_to(path).as_posix()}", f"{dst}/{p.relative_to(path).as_posix()}")
                     for p in sorted(path.rglob("*")) if p.is_file()]
        else:
            with atomic_path(target, fsync=True) as tmp:
                shutil.copyfile(path, tmp)
            pairs = [(src, dst)]
        files = markers[ps.name].get("files") or {}
        for s_rel, d_rel in pairs:
            rec = record(dest / d_rel)
            want = files[s_rel]["sha256"] if s_rel in files else digest(ps.dir / s_rel)
            if rec["sha256"] != want:
                raise CfError(f"publishing {ps.dir / s_rel} to {dest / d_rel}: the copy differs from the "
                              "cached file (a failing disk?); check the disk and run the pipeline again")
            records[d_rel] = rec
    return records


def verify_published(dest: Path, state: dict) -> str | None:
    """None if every file `pipeline.json` (`state`) records in `dest` is there with its size and hash."""
    for rel, rec in (state.get("files") or {}).items():
        path = dest / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != rec["size"] or digest(path) != rec["sha256"]:
            return f"{path} differs from what was published"
    return None
