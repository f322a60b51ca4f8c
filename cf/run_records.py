"""A cached stage's MLflow run: found under its pipeline run, kept in its cache entry, recorded again in
another store.

A finished stage keeps its MLflow run in its cache entry (`mlflow_run.json`: tags, params, metric
histories, artifact paths; `save_record` / `dump_run`). A cached stage whose run is not in the current
store (a new `mlflow.db`, another `MLFLOW_TRACKING_URI`) is recorded there again from it, with the
entry's files as artifacts (`ensure_recorded` / `restore_run`), so every store sees complete pipelines.
An entry cached before records existed is recorded from its `done.json` with the tags and params
`cf.tracking` gives every run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from cf import tracking
from cf.store import run_exists
from cf.utils import atomic_write_json

RECORD_FILE = "mlflow_run.json"


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
