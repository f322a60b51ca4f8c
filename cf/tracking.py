"""MLflow tracking: one run per stage, nested under a pipeline run, with the same names everywhere.

Where runs go: `cfg.tracking.uri` if set, else `$MLFLOW_TRACKING_URI` if set and non-empty,
else the project's own store, `sqlite:///<project root>/mlflow.db`. For a sqlite store the
artifacts live in `mlruns/` beside the database file (so the default store keeps everything in
the project); a tracking server decides its own artifact location.

Every run carries the whole resolved config as flat params (`data.height`, `memory.policy`, ...:
the same keys for every run, so MLflow's compare view lines runs up), the tags `method`,
`memory`, `preset`, `ablation`, `git_sha`, `stage`, and the resolved config as `config.yaml`.

Usage:

    with tracking.start_run(cfg, "teacher") as run:             # nested if a run is active
        trainer = make_trainer(cfg, out, "teacher", logger=run.lightning_logger())
        ...
        tracking.log_metrics({"teacher/psnr": 27.1}, step=trainer.global_step)
        tracking.log_artifact("sheet.png")

Only global rank 0 tracks (other ranks of a distributed job get a no-op run), and
`tracking.enabled=false` makes everything a no-op that touches no file. The module-level
`log_*` functions act on the innermost open run and do nothing when there is none, so library
code can log without knowing whether tracking is on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cf import store
from cf.config.load import ROOT, to_yaml
from cf.utils import git_sha

_QUIET = ("mlflow", "alembic", "sqlalchemy", "urllib3")
_INVALID_METRIC_CHARS = re.compile(r"[^\w./\- :]")
_open_runs: list[Run | None] = []  # innermost last; None marks a no-op run


def tracking_uri(cfg: DictConfig) -> str:
    """The store this config logs to (see the module docstring for the order)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    return f"sqlite:///{ROOT / 'mlflow.db'}"


def metric_key(name: str) -> str:
    """MLflow accepts only `[A-Za-z0-9_./- :]` in metric names: '@' reads as '_at_', others as '_'.

    So `bench/dino_consistency@30s` is stored as `bench/dino_consistency_at_30s`.
    """
    return _INVALID_METRIC_CHARS.sub("_", name.replace("@", "_at_"))


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as `section.key -> string` (lists as JSON), MLflow's param form."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = json.dumps(node) if isinstance(node, list) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def is_global_zero() -> bool:
    """Rank 0 of a distributed job, read from the launcher's variables (set before Lightning starts)."""
    return all(int(os.environ.get(v, "0")) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _quiet() -> None:
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def client(cfg: DictConfig):
    """An MLflow client of the store this config logs to (created first if missing), MLflow's loggers
    quiet: what the readers of finished runs (`cf tables`, the curves, the seed tables) query."""
    _quiet()
    return store.client(tracking_uri(cfg))


class Run:
    """An open MLflow run. Build it with `start_run`; its methods log to this run only."""

    def __init__(self, client, run_id: str, experiment_name: str, uri: str):
        self.client, self.run_id, self.experiment_name, self.uri = client, run_id, experiment_name, uri

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"cannot log artifact {str(p)!r}: no such file or folder")
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def lightning_logger(self):
        """A Lightning `MLFlowLogger` writing into this run (metrics only; the run stays ours)."""
        return _attached_logger(self)


class _NullRun:
    """What `start_run` yields when tracking is off or on a non-zero rank: every call is a no-op."""

    run_id = None
    uri = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def lightning_logger(self) -> bool:
        return False  # Trainer(logger=False): no logger, and no default log folders either


def _experiment_id(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=store.artifact_location(uri))
    except MlflowException:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_tags(cfg: DictConfig, stage: str) -> dict[str, str]:
    sha = git_sha()
    return {
        "method": cfg.method,
        "memory": cfg.memory.policy,
        "preset": cfg.preset,
        "ablation": cfg.tracking.ablation,
        "git_sha": sha,
        "stage": stage,
        "mlflow.source.git.commit": sha.removesuffix("+dirty"),
    }


@contextlib.contextmanager
def start_run(
    cfg: DictConfig,
    stage: str,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Iterator[Run | _NullRun]:
    """Open a run for `stage`; it ends FINISHED, or FAILED/KILLED if the block raises.

    parent_run_id: nest under this run; if None and a run is already open here, nest under
        that one (so a pipeline's stages become its children).
    run_id: continue this existing run (e.g. a stage resumed after a kill) instead of creating
        one; its params are already logged and are not logged again.
    """
    if not cfg.tracking.enabled or not is_global_zero():
        _open_runs.append(None)
        try:
            yield _NullRun()
        finally:
            _open_runs.pop()
        return

    _quiet()
    from mlflow.entities import Param, RunStatus
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    store.ensure_store(uri)  # created and migrated by one process at a time
    client = MlflowClient(tracking_uri=uri)
    tags = {**run_tags(cfg, stage), **{k: str(v) for k, v in (extra_tags or {}).items()}}
    if parent_run_id is None:
        parent_run_id = next((r.run_id for r in reversed(_open_runs) if r is not None), None)
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id

    if run_id is None:
        exp_id = _experiment_id(client, cfg.tracking.experiment, uri)
        base = cfg.tracking.run_name or f"{cfg.method}-{cfg.memory.policy}-{cfg.preset}"
        info = client.create_run(exp_id, tags=tags, run_name=f"{base}/{stage}").info
        run = Run(client, info.run_id, cfg.tracking.experiment, uri)
        params = [Param(k, v) for k, v in flatten_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit for params
            client.log_batch(run.run_id, params=params[i : i + 100])
        run.log_text(to_yaml(cfg), "config.yaml")
    else:
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        run = Run(client, run_id, cfg.tracking.experiment, uri)
        run.set_tags(tags)

    _open_runs.append(run)
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _open_runs.pop()
        try:
            client.set_terminated(run.run_id, status)
        except Exception:
            # the store failed too (a full disk under it): keep the error that stopped the run; the run
            # stays RUNNING until the next pipeline on this run folder marks it KILLED
            if status == "FINISHED":
                raise


def active_run() -> Run | None:
    """The innermost open run, or None (no run, tracking disabled, or a non-zero rank)."""
    return _open_runs[-1] if _open_runs else None


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    run = active_run()
    if run is not None:
        run.log_metrics(metrics, step)


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    run = active_run()
    if run is not None:
        run.log_artifact(path, artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    run = active_run()
    if run is not None:
        run.log_text(text, artifact_file)


def _attached_logger(run: Run):
    from lightning.pytorch.loggers import MLFlowLogger

    class _RunLogger(MLFlowLogger):
        """Writes Lightning's metrics into a run that `start_run` owns.

        It neither ends the run (the context manager sets its final status) nor logs the
        module's hparams (the config is logged once, under the same names for every run).
        """

        def log_hyperparams(self, params: Any) -> None:
            pass

        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            super().log_metrics({metric_key(k): v for k, v in metrics.items()}, step)

        def finalize(self, status: str = "success") -> None:
            pass

    return _RunLogger(experiment_name=run.experiment_name, tracking_uri=run.uri, run_id=run.run_id)
