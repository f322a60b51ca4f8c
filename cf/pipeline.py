"""The end-to-end pipeline: teacher -> teacher_erft -> student -> cdmd1 -> cdmd2 -> bench.

    result = run_pipeline(cfg)        # what `cf ablate` (and `make ablate MEMORY=...`) runs

Stage cache. Each stage writes into `<out>/cache/<stage>-<hash>/` (the stage function itself puts
its files in `<that dir>/<stage>/`, per the stage contract), where the hash covers the config the
stage reads (`Stage.config`) and the hashes of the stages it takes checkpoints from. So a change
invalidates its stage and everything downstream of it, nothing upstream: another `memory.policy`
reuses the teacher (the teacher reads its history through `teacher.memory`, with only the memory
knobs that policy uses), but retrains the student and after. A finished stage has a `done.json`
(written atomically, last); a killed one resumes from its own `last.ckpt` the next time. A lock
per stage directory lets two pipelines that share a stage wait for each other instead of
training it twice.

Outputs. When every stage is done, the final generator and the bench outputs are copied to
`<out>/<preset>/<method>-<memory>-seed<seed>[-<label>]/` (the path the benchmark reads; the label
marks configs other than the method's own, e.g. an ablation variant), with `pipeline.json`.

Tracking. One MLflow run with stage tag `pipeline` (tags method, memory, preset, ablation, variant,
git_sha); each stage opens its own run nested under it. The parent also gets every stage's final
metrics, renamed `<stage>/<name>` (`teacher_erft/psnr_long_all`, `cdmd2/dmd_loss`, `bench/...`),
cached stages included, so the compare view lines pipelines up on one row each.

The stage table is a plain list of `Stage`s, so tests run the machinery on toy stages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig, OmegaConf

from cf import tracking
from cf.config.load import config_hash, load_config
from cf.errors import CfError
from cf.utils import atomic_path, atomic_write_json, git_sha

# (cfg, out_dir, inputs: role -> upstream checkpoint, parent_run_id) -> this stage's checkpoint
StageFn = Callable[[DictConfig, Path, dict[str, Path], "str | None"], Path]

# trainer.* keys that change how a run is logged or scheduled on the CPU, not what it learns
# (resume is exact whatever ckpt_every is).
TRAINER_NOT_RESULT = ("log_every", "ckpt_every", "threads")
# diffusion.* keys only the student reads.
STUDENT_DIFFUSION = ("student_timesteps", "student_shift")
# cdmd.* keys only stage 2 reads (teacher_history is not one: stage 1's teacher and critic also
# read the clean context frames through it).
CDMD_STAGE2_ONLY = (
    "stage2_steps", "long_chunks_start", "long_chunks_end", "cfg_stage2", "stage2", "stage2_max_minutes",
)
# bench.* keys that choose entries for `cf bench consistency`, not what one entry measures.
BENCH_GRID = ("methods", "policies")
# The memory.* knobs each policy reads; other policies (slowfast, new ones) read them all.
# full ignores them (positions are absolute either way); sliding keeps a contiguous window, whose
# bounded positions are a constant shift that rotary attention cannot see.
POLICY_KNOBS: dict[str, tuple[str, ...]] = {
    "full": (),
    "sliding": ("window_frames",),
    "sink": ("sink_frames", "window_frames", "bounded_positions"),
}


# --- the stage table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    config: the config it reads (plain containers); its hash is the stage's cache identity.
    inputs: role -> name of the earlier stage whose checkpoint it takes.
    publish: files or folders (relative to its cache dir) copied into the run dir at the end;
        a later stage publishing the same destination wins.
    """

    name: str
    run: StageFn
    config: Callable[[DictConfig], dict]
    inputs: Callable[[DictConfig], dict[str, str]] = lambda cfg: {}
    enabled: Callable[[DictConfig], bool] = lambda cfg: True
    publish: tuple[tuple[str, str], ...] = ()


def _section(cfg: DictConfig, name: str, drop: tuple[str, ...] = ()) -> dict:
    node = OmegaConf.to_container(cfg[name], resolve=True)
    return {k: v for k, v in node.items() if k not in drop}


def memory_knobs(cfg: DictConfig, policy: str) -> dict:
    """The memory.* values `policy` reads (memory.policy itself excluded)."""
    mem = _section(cfg, "memory", drop=("policy",))
    keep = POLICY_KNOBS.get(policy, tuple(mem))
    return {k: mem[k] for k in keep}


def policy_config(cfg: DictConfig) -> dict:
    """memory.policy and the knobs it reads: what the student's rollouts depend on."""
    return {"policy": cfg.memory.policy, **memory_knobs(cfg, cfg.memory.policy)}


def final_teacher(cfg: DictConfig) -> str:
    return "teacher_erft" if cfg.erft.enabled else "teacher"


def final_generator(cfg: DictConfig) -> str:
    return "cdmd2" if cfg.cdmd.stage2 else "cdmd1"


def teacher_config(cfg: DictConfig) -> dict:
    return {
        "seed": cfg.seed,
        "device": cfg.device,
        "data": _section(cfg, "data"),
        "model": _section(cfg, "model"),
        "diffusion": _section(cfg, "diffusion", drop=STUDENT_DIFFUSION),
        "trainer": _section(cfg, "trainer", drop=TRAINER_NOT_RESULT),
        "teacher": _section(cfg, "teacher"),
        "teacher_memory": memory_knobs(cfg, cfg.teacher.memory),
    }


def erft_config(cfg: DictConfig) -> dict:
    return {"erft": _section(cfg, "erft")}


def student_config(cfg: DictConfig) -> dict:
    return {
        "student": _section(cfg, "student"),
        "memory": policy_config(cfg),
        "diffusion": _section(cfg, "diffusion"),
    }


def cdmd_config(stage: int) -> Callable[[DictConfig], dict]:
    def config(cfg: DictConfig) -> dict:
        drop = CDMD_STAGE2_ONLY if stage == 1 else ("stage2",)
        return {"cdmd": _section(cfg, "cdmd", drop=drop)}

    return config


def bench_config(cfg: DictConfig) -> dict:
    # the method name labels the bench outputs; the memory policy is what generation reads through
    return {
        "method": cfg.method,
        "bench": _section(cfg, "bench", drop=BENCH_GRID),
        "memory": policy_config(cfg),
    }


def _teacher(cfg, out_dir, inputs, parent_run_id):
    from cf.train.teacher_stage import train_teacher

    return train_teacher(cfg, out_dir, stage="teacher", parent_run_id=parent_run_id)


def _teacher_erft(cfg, out_dir, inputs, parent_run_id):
    from cf.train.teacher_stage import train_teacher

    return train_teacher(
        cfg, out_dir, stage="teacher_erft", init_ckpt=inputs["init"], parent_run_id=parent_run_id
    )


def _student(cfg, out_dir, inputs, parent_run_id):
    from cf.train.student_stage import train_student

    return train_student(cfg, out_dir, teacher_ckpt=inputs["teacher"], parent_run_id=parent_run_id)


def _cdmd(stage: int) -> StageFn:
    def run(cfg, out_dir, inputs, parent_run_id):
        from cf.train.student_stage import train_cdmd

        return train_cdmd(
            cfg,
            out_dir,
            stage=stage,
            teacher_ckpt=inputs["teacher"],
            init_ckpt=inputs["init"],
            parent_run_id=parent_run_id,
        )

    return run


def _bench(cfg, out_dir, inputs, parent_run_id):
    from cf.bench.consistency import run_consistency

    generator = Path(inputs["generator"]).parent / "generator.safetensors"
    entries = [{"method": cfg.method, "policy": cfg.memory.policy, "generator": generator}]
    run_consistency(cfg, entries, out_dir / "bench", parent_run_id=parent_run_id)
    return out_dir / "bench"


GENERATOR = "generator.safetensors"
STAGES: tuple[Stage, ...] = (
    Stage("teacher", _teacher, teacher_config),
    Stage(
        "teacher_erft",
        _teacher_erft,
        erft_config,
        inputs=lambda cfg: {"init": "teacher"},
        enabled=lambda cfg: cfg.erft.enabled,
    ),
    Stage("student", _student, student_config, inputs=lambda cfg: {"teacher": final_teacher(cfg)}),
    Stage(
        "cdmd1",
        _cdmd(1),
        cdmd_config(1),
        inputs=lambda cfg: {"teacher": final_teacher(cfg), "init": "student"},
        publish=((f"cdmd1/{GENERATOR}", GENERATOR),),
    ),
    Stage(
        "cdmd2",
        _cdmd(2),
        cdmd_config(2),
        inputs=lambda cfg: {"teacher": final_teacher(cfg), "init": "cdmd1"},
        enabled=lambda cfg: cfg.cdmd.stage2,
        publish=((f"cdmd2/{GENERATOR}", GENERATOR),),
    ),
    Stage(
        "bench",
        _bench,
        bench_config,
        inputs=lambda cfg: {"generator": final_generator(cfg)},
        publish=(("bench", "bench"),),
    ),
)


# --- planning: hashes and cache directories -----------------------------------------------------


@dataclass
class PlannedStage:
    stage: Stage
    key: str  # the cache hash
    dir: Path  # <cache>/<stage>-<key>
    inputs: dict[str, str]  # role -> upstream stage name
    config: dict

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def marker(self) -> Path:
        return self.dir / "done.json"

    @property
    def done(self) -> bool:
        return self.marker.is_file()


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


# --- progress -----------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def past_durations(root: Path, preset: str) -> dict[str, float]:
    """Median seconds per stage over this preset's finished (not cached) stages under `root`."""
    seen: dict[str, list[float]] = {}
    for marker in root.glob("*/done.json"):
        with contextlib.suppress(OSError, ValueError):
            d = json.loads(marker.read_text())
            if d.get("preset") == preset and not d.get("resumed") and d.get("seconds") is not None:
                seen.setdefault(d["stage"], []).append(float(d["seconds"]))
    return {k: statistics.median(v) for k, v in seen.items()}


class PipelineProgress:
    """The pipeline's one status display: a line per stage boundary, between the stages' step bars.

        [pipeline ###--- 3/6] student running | done: teacher (cached), teacher_erft 0:04:10 |
            elapsed 0:04:12 | left ~0:15:30

    Time left sums the median past durations of the remaining stages at this preset (from the
    cache's done.json files); stages never timed before are named instead of guessed.
    """

    def __init__(
        self,
        stages: list[PlannedStage],
        estimates: dict[str, float],
        stream: TextIO | None = None,
        title: str = "pipeline",
    ):
        self.stages, self.estimates, self.title = stages, estimates, title
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.time()
        self.finished: dict[str, str] = {}  # stage -> "cached" | duration

    def _left(self, current: str | None, current_start: float | None) -> str:
        todo = [s.name for s in self.stages if s.name not in self.finished]
        unknown = [n for n in todo if n not in self.estimates]
        left = sum(self.estimates.get(n, 0.0) for n in todo)
        if current is not None and current in self.estimates and current_start is not None:
            left -= min(self.estimates[current], time.time() - current_start)
        text = f"left ~{_clock(max(0.0, left))}"
        if unknown:
            text = (
                f"left > {_clock(max(0.0, left))} (not timed yet: {', '.join(unknown)})"
                if left
                else f"left: unknown (not timed yet: {', '.join(unknown)})"
            )
        return text

    def _line(self, what: str, current: str | None = None, start: float | None = None) -> None:
        n, k = len(self.stages), len(self.finished)
        bar = "#" * k + "-" * (n - k)
        done = ", ".join(f"{s} {d}" for s, d in self.finished.items()) or "-"
        print(
            f"[{self.title} {bar} {k}/{n}] {what} | done: {done} | elapsed {_clock(time.time() - self.t0)}"
            f" | {self._left(current, start)}",
            file=self.stream,
            flush=True,
        )

    def start(self, ps: PlannedStage, resumed: bool) -> float:
        now = time.time()
        self._line(f"{ps.name} {'resuming' if resumed else 'running'} in {ps.dir}", ps.name, now)
        return now

    def end(self, ps: PlannedStage, seconds: float | None) -> None:
        self.finished[ps.name] = "cached" if seconds is None else _clock(seconds)

    def close(self) -> None:
        self._line("all stages done")


# --- running ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path, stream: TextIO) -> Iterator[None]:
    """An exclusive lock on `path` (another pipeline on the same stage waits for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[pipeline] waiting for another process that holds {path}", file=stream, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CfError(f"cannot read {str(path)!r} ({e}); delete it to redo that step") from e


def parent_metric_name(stage: str, name: str) -> str:
    """A stage metric as the pipeline run shows it: teacher_erft's `teacher/psnr` -> `teacher_erft/psnr`."""
    return f"{stage}/{name.split('/', 1)[-1]}"


def _stage_run_metrics(parent: Any, stage: str) -> tuple[str | None, dict[str, float]]:
    """The latest metrics of `stage`'s run nested under `parent` (None, {} without tracking)."""
    if getattr(parent, "run_id", None) is None:
        return None, {}
    client = parent.client
    exp = client.get_experiment_by_name(parent.experiment_name)
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None, {}
    # `stage/metric` names only: Lightning's bare `epoch` counter is not a result
    return runs[0].info.run_id, {k: float(v) for k, v in runs[0].data.metrics.items() if "/" in k}


def _close_orphans(parent: Any) -> None:
    """Mark KILLED the stage runs a hard kill (SIGKILL, power loss) left RUNNING under `parent`."""
    exp = parent.client.get_experiment_by_name(parent.experiment_name)
    flt = f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'"
    for run in parent.client.search_runs([exp.experiment_id], filter_string=flt):
        parent.client.set_terminated(run.info.run_id, "KILLED")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def run_stage(
    cfg: DictConfig, ps: PlannedStage, inputs: dict[str, Path], parent: Any, progress: PipelineProgress
) -> tuple[dict, bool]:
    """Run one stage (or resume it) unless its done.json exists; returns (its marker, whether it ran)."""
    with _locked(ps.dir / ".lock", progress.stream):
        if ps.done:  # finished by another pipeline while we waited
            progress.end(ps, None)
            return _read_json(ps.marker), False
        started = ps.dir / "stage.json"
        resumed = started.is_file()
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
        t0 = progress.start(ps, resumed)
        ckpt = ps.stage.run(cfg, ps.dir, inputs, getattr(parent, "run_id", None))
        seconds = time.time() - t0
        run_id, metrics = _stage_run_metrics(parent, ps.name)
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
            "metrics": metrics,
        }
        atomic_write_json(ps.marker, marker)
        progress.end(ps, seconds)
        return marker, True


def checkpoint_of(ps: PlannedStage, marker: dict) -> Path:
    p = Path(marker["checkpoint"])
    return p if p.is_absolute() else ps.dir / p


def _publish(planned: list[PlannedStage], dest: Path) -> list[str]:
    """Copy each stage's published files into `dest` (later stages win); returns what was copied."""
    dest.mkdir(parents=True, exist_ok=True)
    copied: dict[str, Path] = {}
    for ps in planned:
        for src, dst in ps.stage.publish:
            path = ps.dir / src
            if not path.exists():
                raise CfError(
                    f"stage {ps.name} finished but did not write {str(path)!r}, which the "
                    f"pipeline publishes as {dst}; check that stage's output"
                )
            copied[dst] = path
    for dst, path in copied.items():
        target = dest / dst
        if path.is_dir():
            tmp = dest / f".{dst}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)
    return sorted(copied)


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


def _existing_run(cfg: DictConfig, run_id: str | None) -> str | None:
    """`run_id` if the store still has it (a resumed pipeline continues its parent run)."""
    if run_id is None or not cfg.tracking.enabled:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking.tracking_uri(cfg)).get_run(run_id)
    except MlflowException:
        return None
    return run_id


def run_pipeline(
    cfg: DictConfig,
    stages: tuple[Stage, ...] = STAGES,
    *,
    label: str | None = None,
    variant: str = "",
    stream: TextIO | None = None,
) -> PipelineResult:
    """Run every enabled stage not already done (resuming a killed one) and publish the results."""
    planned = plan(cfg, stages)
    dest = run_dir(cfg, label)
    state_path = dest / "pipeline.json"
    state = _read_json(state_path) if state_path.is_file() else {}
    same_plan = state.get("stages", {}) == {ps.name: ps.key for ps in planned}
    # a killed pipeline continues its parent run; a finished one run again is a new run
    resumable = same_plan and not state.get("complete", False)
    resume_id = _existing_run(cfg, state.get("parent_run_id")) if resumable else None
    progress = PipelineProgress(
        planned, past_durations(cache_root(cfg), cfg.preset), stream, title=run_name(cfg, label)
    )
    result = PipelineResult(dest, planned, {})
    tags = {
        "variant": variant,
        "run_dir": _relative(dest, Path(cfg.out)),
        "stages": ",".join(p.name for p in planned),
    }
    with tracking.start_run(cfg, "pipeline", extra_tags=tags, run_id=resume_id) as parent:
        result.parent_run_id = parent.run_id
        if resume_id is not None:
            _close_orphans(parent)
        atomic_write_json(
            state_path,
            {
                "parent_run_id": parent.run_id,
                "stages": {ps.name: ps.key for ps in planned},
                "complete": False,
            },
        )
        for ps in planned:
            if ps.done:
                marker = _read_json(ps.marker)
                progress.end(ps, None)
            else:
                inputs = {role: result.checkpoint(up) for role, up in ps.inputs.items()}
                marker, ran = run_stage(cfg, ps, inputs, parent, progress)
                if ran:
                    result.ran.append(ps.name)
            result.markers[ps.name] = marker
            parent.log_metrics({parent_metric_name(ps.name, k): v for k, v in marker["metrics"].items()})
            parent.log_metrics({f"pipeline/{ps.name}_cached": float(ps.name not in result.ran)})
            if marker.get("seconds") is not None:  # what training it took (when it was trained)
                parent.log_metrics({f"pipeline/{ps.name}_seconds": float(marker["seconds"])})
            parent.set_tags({f"cache.{ps.name}": ps.dir.name})
            if marker.get("mlflow_run_id"):  # its own run (an earlier parent's, if cached)
                parent.set_tags({f"run.{ps.name}": marker["mlflow_run_id"]})
        published = _publish(planned, dest)
        progress.close()
        parent.log_metrics(
            {"pipeline/seconds": time.time() - progress.t0, "pipeline/stages_run": float(len(result.ran))}
        )
        atomic_write_json(
            state_path,
            {
                "parent_run_id": parent.run_id,
                "stages": {ps.name: ps.key for ps in planned},
                "complete": True,
                "preset": cfg.preset,
                "method": cfg.method,
                "memory": cfg.memory.policy,
                "seed": cfg.seed,
                "label": label,
                "variant": variant,
                "published": published,
                "git_sha": git_sha(),
                "cache": {ps.name: _relative(ps.dir, Path(cfg.out)) for ps in planned},
                "ran": result.ran,
                "seconds": {n: m.get("seconds") for n, m in result.markers.items()},
            },
        )
    return result
