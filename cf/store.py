"""The MLflow store under faults: safe creation, where a sqlite store keeps its artifacts, and closing what
a kill left open.

- `ensure_store(uri)`: the first connection of each process to a sqlite store happens under a file
  lock (`<db dir>/mlruns/.<db name>.lock`), so when two processes start on a store that does not
  exist yet one creates and migrates it and the other waits (MLflow's own migrations are not safe to
  run twice at once: `table _alembic_tmp_tags already exists`, a store left unusable). A new store
  is built under a temporary name and renamed into place, so a kill mid-migration cannot break it.
- `artifact_location(uri)`: a sqlite store's artifacts live in `mlruns/` beside its database file.
- `close_dead_pipelines`: pipeline runs of a run folder that are still RUNNING while this process
  holds that folder's lock belong to a killed process: they and their RUNNING stage runs are marked
  KILLED, whatever the moment of the kill.

`cf.tracking` opens its runs on top of this module; a cached stage's run is recorded again in another
store by `cf.run_records`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from cf.errors import CfError
from cf.faults import failpoint, is_disk_full, one_line

RUN_DIR_TAG = "cf.run_dir"  # host:absolute run folder of a pipeline run (which lock it ran under)
_ready: set[str] = set()


@contextlib.contextmanager
def locked(path: Path, stream: TextIO | None = None, what: str = "another process") -> Iterator[None]:
    """An exclusive lock on `path`; says so on `stream` when it has to wait for `what`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if stream is not None:
                print(f"[pipeline] waiting for {what} (it holds {path})", file=stream, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """`<db dir>/mlruns` for a sqlite store; None (the server's choice) otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :].split("?")[0])  # sqlite:////abs/x.db -> /abs/x.db
    return (db.resolve().parent / "mlruns").as_uri()


def _create_sqlite(db: Path) -> None:
    """Create and migrate a new sqlite store under a temporary name, then rename it into place: a kill
    during MLflow's migrations (seconds) then leaves a temporary file, never a half-created store."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    created = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_location(f"sqlite:///{db}"))
    created.engine.dispose()
    failpoint("store.created")
    os.replace(tmp, db)


def ensure_store(uri: str) -> None:
    """Create (or open) the store at `uri` once per process, under a file lock for sqlite stores."""
    if uri in _ready:
        return
    db = sqlite_path(uri)
    if db is not None:
        fix = "set MLFLOW_TRACKING_URI (or tracking.uri) to a store in a writable folder"
        try:
            (db.parent / "mlruns").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CfError(f"cannot create the MLflow store {str(db)!r}: {e.strerror or e}; {fix}") from None
        with locked(db.parent / "mlruns" / f".{db.name}.lock"):
            try:
                for leftover in db.parent.glob(f".{db.name}.creating-*"):  # a creation a kill stopped
                    leftover.unlink()
                if not db.exists():
                    _create_sqlite(db)
                from mlflow.tracking import MlflowClient

                MlflowClient(uri).search_experiments(max_results=1)
            except Exception as e:  # noqa: BLE001 - MLflow and SQLAlchemy raise many types here
                if is_disk_full(e):
                    raise
                raise CfError(
                    f"the MLflow store {str(db)!r} cannot be opened ({one_line(str(e))[:300]}); if it was "
                    f"left half-created (by an older version of cf), move it aside (mv {db} {db}.broken) "
                    "and run again: a new store is created and cached stages are recorded in it again"
                ) from None
    _ready.add(uri)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    ensure_store(uri)
    return MlflowClient(uri)


def run_exists(mlflow_client, run_id: str | None) -> bool:
    """True if the store has `run_id` and it is not deleted."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


def run_dir_tag(dest: Path) -> str:
    return f"{socket.gethostname()}:{Path(dest).resolve()}"


# --- closing what a kill left RUNNING -----------------------------------------------------------


def _running(mlflow_client, exp_id: str, flt: str) -> list:
    return list(mlflow_client.search_runs([exp_id], filter_string=f"attributes.status = 'RUNNING' and {flt}"))


def close_tree(mlflow_client, exp_id: str, run_id: str) -> list[str]:
    """Mark KILLED `run_id` and its descendants that are still RUNNING; returns the ids closed."""
    closed = []
    for child in _running(mlflow_client, exp_id, f"tags.mlflow.parentRunId = '{run_id}'"):
        closed += close_tree(mlflow_client, exp_id, child.info.run_id)
    if mlflow_client.get_run(run_id).info.status == "RUNNING":
        mlflow_client.set_terminated(run_id, "KILLED")
        closed.append(run_id)
    return closed


def close_dead_pipelines(uri: str, experiment: str, tag: str, also: tuple[str | None, ...] = ()) -> list[str]:
    """KILLED for the RUNNING pipeline runs tagged `tag` (call it holding the run folder's lock: no live
    process owns them) and for the RUNNING descendants of those and of `also` (a resumed parent)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    dead = [r.info.run_id for r in _running(c, exp.experiment_id, "tags.stage = 'pipeline'")
            if r.data.tags.get(RUN_DIR_TAG) == tag]
    closed: list[str] = []
    for run_id in dict.fromkeys([*dead, *(a for a in also if a and run_exists(c, a))]):
        closed += close_tree(c, exp.experiment_id, run_id)
    return closed
