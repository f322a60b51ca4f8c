"""The MLflow store under faults: safe creation, closing what a kill left open, re-recording cached runs.

- `ensure_store(uri)`: the first connection of each process to a sqlite store happens under a file
  lock (`<db dir>/mlruns/.<db name>.lock`), so when two processes start on a store that does not
  exist yet one creates and migrates it and the other waits (MLflow's own migrations are not safe to
  run twice at once: `table _alembic_tmp_tags already exists`, a store left unusable). A new store
  is built under a temporary name and renamed into place, so a kill mid-migration cannot break it.
- `close_dead_pipelines`: pipeline runs of a run folder that are still RUNNING while this process
  holds that folder's lock belong to a killed process: they and their RUNNING stage runs are marked
  KILLED, whatever the moment of the kill.
- `dump_run` / `ensure_recorded`: a finished stage keeps its MLflow run in its cache entry
  (`mlflow_run.json`: tags, params, metric histories, artifact paths). A cached stage whose run is not
  in the current store (a new `mlflow.db`, another `MLFLOW_TRACKING_URI`) is recorded there again from
  it, with the entry's files as artifacts, so every store sees complete pipelines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from cf.errors import CfError
from cf.faults import failpoint, is_disk_full, one_line

RUN_DIR_TAG = "cf.run_dir"  # host:absolute run folder of a pipeline run (which lock it ran under)
RECORD_FILE = "mlflow_run.json"
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


def _create_sqlite(db: Path) -> None:
    """Create and migrate a new sqlite store under a temporary name, then rename it into place: a kill
    during MLflow's migrations (seconds) then leaves a temporary file, never a half-created store."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from cf.tracking import artifact_location

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


# --- the stage runs of the cache ----------------------------------------------------------------


def stage_run(parent: Any, stage: str) -> tuple[str | None, dict[str, float]]:
    """The latest run of `stage` nested under `parent` and its `stage/metric` values (None, {} without)."""
    if getattr(parent, "run_id", None) is None:
        return None, {}
    exp = parent.client.get_experiment_by_name(parent.experiment_name)
    runs = parent.client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None, {}
    # `stage/metric` names only: Lightning's bare `epoch` counter is not a result
    return runs[0].info.run_id, {k: float(v) for k, v in runs[0].data.metrics.items() if "/" in k}


def _artifacts(mlflow_client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in mlflow_client.list_artifacts(run_id, path):
        out += _artifacts(mlflow_client, run_id, f.path) if f.is_dir else [f.path]
    return out


def dump_run(mlflow_client, run_id: str) -> dict:
    """Everything needed to record the run again in another store (artifacts by path)."""
    run = mlflow_client.get_run(run_id)
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "tags": {k: v for k, v in run.data.tags.items() if k != "mlflow.parentRunId"},
        "params": dict(run.data.params),
        "metrics": {
            k: [[m.step, m.value, m.timestamp] for m in mlflow_client.get_metric_history(run_id, k)]
            for k in run.data.metrics
        },
        "artifacts": _artifacts(mlflow_client, run_id),
    }


def _record_from_marker(cfg, stage: str, marker: dict, files_dir: Path) -> dict:
    """A record for an entry cached before records existed: its final metrics and its files."""
    from cf import tracking

    ts = int(time.time() * 1000)
    base = cfg.tracking.run_name or f"{cfg.method}-{cfg.memory.policy}-{cfg.preset}"
    files = [p.relative_to(files_dir).as_posix() for p in sorted(files_dir.rglob("*"))
             if p.is_file() and p.suffix not in (".ckpt", ".safetensors")] if files_dir.is_dir() else []
    return {
        "run_id": marker.get("mlflow_run_id"),
        "run_name": f"{base}/{stage}",
        "status": "FINISHED",
        "start_time": ts,
        "end_time": ts,
        "tags": tracking.run_tags(cfg, stage),
        "params": tracking.flatten_config(cfg),
        "metrics": {k: [[0, float(v), ts]] for k, v in (marker.get("metrics") or {}).items()},
        "artifacts": files,
    }


def restore_run(parent: Any, record: dict, files_dir: Path, cache_entry: str) -> str:
    """Create the run of `record` nested under `parent`, with its params, metric histories, tags and the
    artifacts still found under `files_dir`; returns the new run id."""
    from mlflow.entities import Metric, Param

    c = parent.client
    exp_id = c.get_run(parent.run_id).info.experiment_id
    tags = {
        **record.get("tags", {}),
        "mlflow.parentRunId": parent.run_id,
        "cf.restored_from": str(record.get("run_id")),
        "cf.cache": cache_entry,
    }
    run_id = c.create_run(exp_id, start_time=record.get("start_time"), tags=tags,
                          run_name=record.get("run_name")).info.run_id
    params = [Param(k, str(v)) for k, v in record.get("params", {}).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    metrics = [Metric(k, float(v), int(ts), int(step)) for k, hist in record.get("metrics", {}).items()
               for step, v, ts in hist]
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i : i + 1000])
    missing = []
    for rel in record.get("artifacts", []):
        f = files_dir / rel
        if f.is_file():
            folder = str(Path(rel).parent)
            c.log_artifact(run_id, str(f), None if folder == "." else folder)
        else:
            missing.append(rel)
    if missing:
        c.set_tag(run_id, "cf.missing_artifacts", ", ".join(missing)[:5000])
    c.set_terminated(run_id, record.get("status") or "FINISHED", end_time=record.get("end_time"))
    return run_id


def save_record(parent: Any, run_id: str | None, entry: Path) -> None:
    """Keep `run_id`'s record in the cache entry (what `ensure_recorded` restores from)."""
    if run_id is not None:
        from cf.utils import atomic_write_json

        atomic_write_json(entry / RECORD_FILE, dump_run(parent.client, run_id))


def ensure_recorded(parent: Any, cfg, stage: str, entry: Path, marker: dict,
                    stream: TextIO | None = None) -> str | None:
    """The id of the cached stage's run in `parent`'s store, recording it there first if it is missing
    (`marker["mlflow_runs"]` then maps this store to the new id; the caller saves the marker)."""
    if getattr(parent, "run_id", None) is None:
        return marker.get("mlflow_run_id")
    known = (marker.get("mlflow_runs") or {}).get(parent.uri), marker.get("mlflow_run_id")
    for run_id in known:
        if run_exists(parent.client, run_id):
            return run_id
    path = entry / RECORD_FILE
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        record = None
    files_dir = entry / stage
    if record is None:
        record = _record_from_marker(cfg, stage, marker, files_dir)
    run_id = restore_run(parent, record, files_dir, entry.name)
    marker.setdefault("mlflow_runs", {})[parent.uri] = run_id
    print(f"[pipeline] {stage}: its run {known[1]} is not in this MLflow store; recorded it again from the "
          f"cache as {run_id}", file=stream if stream is not None else sys.stderr, flush=True)
    return run_id
