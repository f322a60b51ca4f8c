"""The end-to-end pipeline: teacher -> teacher_erft -> student -> cdmd1 -> cdmd2 -> bench.

    result = run_pipeline(cfg)        # what `cf ablate` (and `make ablate MEMORY=...`) runs

Stage cache. Each stage writes into `<out>/cache/<stage>-<hash>/` (the stage function itself puts
its files in `<that dir>/<stage>/`, per the stage contract), where the hash covers the config the
stage reads (`Stage.config`) and the hashes of the stages it takes checkpoints from. So a change
invalidates its stage and everything downstream of it, nothing upstream: another `memory.policy`
reuses the teacher (the teacher reads its history through `teacher.memory`, with only the memory
knobs that policy uses), but retrains the student and after. The stage table lives in
`cf/stages.py`. A finished stage has a `done.json` (written atomically, last) recording every file it
wrote with its size and sha256; the entry is verified before it is reused, and a damaged one is moved
aside and redone (`cf/stage_cache.py`). A killed stage resumes from its own `last.ckpt` the next time.
A lock per stage directory lets two pipelines that share a stage wait for each other instead of
training it twice; a lock per run folder makes two identical pipelines take turns.

Outputs. When every stage is done, the final generator and the bench outputs are copied to
`<out>/<preset>/<method>-<memory>-seed<seed>[-<label>]/` (the path the benchmark reads; the label
marks configs other than the method's own, e.g. an ablation variant), with `pipeline.json`.

Tracking. One MLflow run with stage tag `pipeline` (tags method, memory, preset, ablation, variant,
git_sha); each stage opens its own run nested under it. The parent also gets every stage's final
metrics, renamed `<stage>/<name>` (`teacher_erft/psnr_long_all`, `cdmd2/dmd_loss`, `bench/...`),
cached stages included, so the compare view lines pipelines up on one row each. A cached stage whose
run is missing from the current store is recorded there again from the cache (`cf/run_records.py`), and
runs a killed pipeline left RUNNING are marked KILLED by the next one on its run folder.

The stage table is a plain list of `Stage`s, so tests run the machinery on toy stages.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig

from cf import run_records, stage_cache, store, tracking
from cf.config.load import config_hash, load_config
from cf.errors import CfError
from cf.faults import failpoint
from cf.progress import PipelineProgress, past_durations
from cf.stages import STAGES, PlannedStage, Stage, StageFn, bench_config, final_generator, final_teacher  # noqa: F401
from cf.utils import atomic_write_json, git_sha

# --- planning: hashes and cache directories -----------------------------------------------------


def cache_root(cfg: DictConfig) -> Path:
    return Path(cfg.out) / "cache"


def plan(cfg: DictConfig, stages: tuple[Stage, ...] = STAGES) -> list[PlannedStage]:
    """The enabled stages in order, each with its hash and cache directory (nothing is run)."""
    out: list[PlannedStage] = []
    keys: dict[str, str] = {}
    for st in stages:
        if not st.enabled(cfg):
            continue
        inputs = st.inputs(cfg)
        for role, up in inputs.items():
            if up not in keys:
                raise CfError(
                    f"stage {st.name!r} takes its {role!r} checkpoint from stage {up!r}, which is "
                    f"disabled or comes later; enabled so far: {', '.join(keys) or 'none'}"
                )
        config = st.config(cfg)
        key = config_hash(
            {
                "stage": st.name,
                "config": config,
                "inputs": {role: keys[up] for role, up in sorted(inputs.items())},
            }
        )
        keys[st.name] = key
        out.append(PlannedStage(st, key, cache_root(cfg) / f"{st.name}-{key}", inputs, config))
    if not out:
        raise CfError("the pipeline has no enabled stage")
    return out


def run_name(cfg: DictConfig, label: str | None = None) -> str:
    base = f"{cfg.method}-{cfg.memory.policy}-seed{cfg.seed}"
    return f"{base}-{label}" if label else base


def run_dir(cfg: DictConfig, label: str | None = None) -> Path:
    """Where a pipeline's final generator and bench outputs go (what `cf bench consistency` reads)."""
    return Path(cfg.out) / cfg.preset / run_name(cfg, label)


def canonical_label(cfg: DictConfig, stages: tuple[Stage, ...] = STAGES) -> str | None:
    """None if `cfg` is the method's own config at its memory policy and seed, else `cfg<hash>`.

    So only the canonical config owns `<method>-<memory>-seed<seed>/`; anything else (an override,
    an ablation variant) gets a suffixed directory instead of overwriting the method's generator.
    """
    ref = load_config(
        cfg.preset, cfg.method, [f"memory.policy={cfg.memory.policy}", f"seed={cfg.seed}"], out=cfg.out
    )
    mine, theirs = plan(cfg, stages)[-1].key, plan(ref, stages)[-1].key
    return None if mine == theirs else f"cfg{mine[:8]}"


# --- running ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CfError(f"cannot read {str(path)!r} ({e}); delete it to redo that step") from e


def parent_metric_name(stage: str, name: str) -> str:
    """A stage metric as the pipeline run shows it: teacher_erft's `teacher/psnr` -> `teacher_erft/psnr`."""
    return f"{stage}/{name.split('/', 1)[-1]}"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _reuse(cfg: DictConfig, ps: PlannedStage, parent: Any, upstream: dict[str, dict], stream: TextIO) -> dict:
    """The finished entry's marker if it verifies (its stage run then recorded in the current store), or
    `{}` after moving a damaged or stale entry's files aside: the caller redoes the stage."""
    marker = _read_json(ps.marker)
    bad = stage_cache.problem(ps, marker, upstream)
    if bad is not None:
        kind, why = bad
        aside = stage_cache.move_aside(ps, kind)
        kept = stage_cache.keep_good_checkpoint(ps, aside, marker) if kind == "damaged" else None
        resume = f"; it resumes from the checkpoint there, which verifies ({kept})" if kept else ""
        print(f"[pipeline] {ps.name}: the cached entry is {kind}: {why}. Moved it aside to {aside} and "
              f"redoing the stage{resume}", file=stream, flush=True)
        return {}
    before = json.dumps(marker, sort_keys=True)
    stage_cache.adopt(ps, marker, upstream)
    run_records.ensure_recorded(parent, cfg, ps.name, ps.dir, marker, stream)
    if json.dumps(marker, sort_keys=True) != before:
        atomic_write_json(ps.marker, marker, fsync=True)
    return marker


def run_stage(
    cfg: DictConfig,
    ps: PlannedStage,
    inputs: dict[str, Path],
    parent: Any,
    progress: PipelineProgress,
    upstream: dict[str, dict] | None = None,
) -> tuple[dict, bool]:
    """Reuse the stage's verified cache entry, or run (resume, redo) it; returns (its marker, whether it ran).

    `upstream`: the markers of the stages before it (whose checkpoints it reads), for the stale check.
    """
    upstream = upstream or {}
    with store.locked(ps.dir / ".lock", progress.stream, f"another pipeline working on stage {ps.name}"):
        if ps.done and (marker := _reuse(cfg, ps, parent, upstream, progress.stream)):
            progress.end(ps, None)
            return marker, False
        stage_cache.clean_partials(ps.dir)
        started = ps.dir / "stage.json"
        resumed = started.is_file() or (ps.dir / ps.name / "last.ckpt").is_file()
        atomic_write_json(
            started,
            {
                "stage": ps.name,
                "hash": ps.key,
                "preset": cfg.preset,
                "inputs": {r: str(p) for r, p in inputs.items()},
                "config": ps.config,
            },
        )
        failpoint(f"stage.start:{ps.name}")
        t0 = progress.start(ps, resumed)
        ckpt = ps.stage.run(cfg, ps.dir, inputs, getattr(parent, "run_id", None))
        seconds = time.time() - t0
        failpoint(f"stage.ran:{ps.name}")
        run_id, metrics = run_records.stage_run(parent, ps.name)
        run_records.save_record(parent, run_id, ps.dir)
        marker = {
            "stage": ps.name,
            "hash": ps.key,
            "preset": cfg.preset,
            "checkpoint": _relative(ckpt, ps.dir),
            "seconds": round(seconds, 1),
            "resumed": resumed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "git_sha": git_sha(),
            "mlflow_run_id": run_id,
            "mlflow_runs": {parent.uri: run_id} if run_id else {},  # store -> its id of this run
            "metrics": metrics,
        }
        stage_cache.finish_marker(ps, marker, upstream)
        atomic_write_json(ps.marker, marker, fsync=True)
        failpoint(f"stage.done:{ps.name}")
        progress.end(ps, seconds)
        return marker, True


def checkpoint_of(ps: PlannedStage, marker: dict) -> Path:
    p = Path(marker["checkpoint"])
    return p if p.is_absolute() else ps.dir / p


@dataclass
class PipelineResult:
    run_dir: Path
    stages: list[PlannedStage]
    markers: dict[str, dict]
    ran: list[str] = field(default_factory=list)  # stages trained in this call (the rest were cached)
    parent_run_id: str | None = None

    def checkpoint(self, stage: str) -> Path:
        ps = next(s for s in self.stages if s.name == stage)
        return checkpoint_of(ps, self.markers[stage])


def run_pipeline(
    cfg: DictConfig,
    stages: tuple[Stage, ...] = STAGES,
    *,
    label: str | None = None,
    variant: str = "",
    stream: TextIO | None = None,
) -> PipelineResult:
    """Run every enabled stage not already done (resuming a killed one) and publish the results.

    Two pipelines on the same run folder take turns (a lock on it): the second then finds every stage
    cached. Holding that lock, pipeline runs of this folder still RUNNING were left by a killed process
    and are marked KILLED first.
    """
    planned = plan(cfg, stages)
    dest = run_dir(cfg, label)
    stream = stream if stream is not None else sys.stderr
    with store.locked(dest / ".pipeline.lock", stream, "another pipeline writing the same run folder"):
        failpoint("pipeline.locked")
        return _run_locked(cfg, planned, dest, label, variant, stream)


def _run_locked(
    cfg: DictConfig, planned: list[PlannedStage], dest: Path, label: str | None, variant: str, stream: TextIO
) -> PipelineResult:
    state_path = dest / "pipeline.json"
    state = _read_json(state_path) if state_path.is_file() else {}
    keys = {ps.name: ps.key for ps in planned}
    # a killed pipeline continues its parent run; a finished one run again is a new run
    resumable = state.get("stages", {}) == keys and not state.get("complete", False)
    tag = store.run_dir_tag(dest)
    resume_id = None
    if cfg.tracking.enabled and tracking.is_global_zero():
        uri = tracking.tracking_uri(cfg)
        if resumable and store.run_exists(store.client(uri), state.get("parent_run_id")):
            resume_id = state["parent_run_id"]
        store.close_dead_pipelines(uri, cfg.tracking.experiment, tag, also=(resume_id,))
    progress = PipelineProgress(
        planned, past_durations(cache_root(cfg), cfg.preset), stream, title=run_name(cfg, label)
    )
    result = PipelineResult(dest, planned, {})
    tags = {
        "variant": variant,
        "run_dir": _relative(dest, Path(cfg.out)),
        "stages": ",".join(p.name for p in planned),
        store.RUN_DIR_TAG: tag,
    }
    with tracking.start_run(cfg, "pipeline", extra_tags=tags, run_id=resume_id) as parent:
        failpoint("pipeline.parent_created")
        result.parent_run_id = parent.run_id
        atomic_write_json(state_path, {"parent_run_id": parent.run_id, "stages": keys, "complete": False})
        for ps in planned:
            inputs = {role: result.checkpoint(up) for role, up in ps.inputs.items()}
            marker, ran = run_stage(cfg, ps, inputs, parent, progress, result.markers)
            if ran:
                result.ran.append(ps.name)
            result.markers[ps.name] = marker
            parent.log_metrics({parent_metric_name(ps.name, k): v for k, v in marker["metrics"].items()})
            parent.log_metrics({f"pipeline/{ps.name}_cached": float(not ran)})
            if marker.get("seconds") is not None:  # what training it took (when it was trained)
                parent.log_metrics({f"pipeline/{ps.name}_seconds": float(marker["seconds"])})
            parent.set_tags({f"cache.{ps.name}": ps.dir.name})
            stage_run = (marker.get("mlflow_runs") or {}).get(parent.uri) or marker.get("mlflow_run_id")
            if stage_run:  # its own run (an earlier parent's, if cached)
                parent.set_tags({f"run.{ps.name}": stage_run})
        files = stage_cache.publish(planned, result.markers, dest)
        progress.close()
        parent.log_metrics(
            {"pipeline/seconds": time.time() - progress.t0, "pipeline/stages_run": float(len(result.ran))}
        )
        atomic_write_json(
            state_path,
            {
                "parent_run_id": parent.run_id,
                "stages": keys,
                "complete": True,
                "preset": cfg.preset,
                "method": cfg.method,
                "memory": cfg.memory.policy,
                "seed": cfg.seed,
                "label": label,
                "variant": variant,
                "published": sorted({dst for ps in planned for _, dst in ps.stage.publish}),
                "files": files,
                "git_sha": git_sha(),
                "cache": {ps.name: _relative(ps.dir, Path(cfg.out)) for ps in planned},
                "ran": result.ran,
                "seconds": {n: m.get("seconds") for n, m in result.markers.items()},
            },
            fsync=True,
        )
        failpoint("pipeline.done")
    return result
