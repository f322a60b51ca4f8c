"""The pipeline's stage table: what each stage reads from the config (its cache identity), which
earlier stages' checkpoints it takes, whether it is enabled, and what it publishes. `cf.pipeline`
plans it and runs it; a `PlannedStage` (a stage with its cache hash and entry) lives here, beside
`Stage`, so that the pipeline's cache checks and progress lines take it from below. Tests swap in toy
stage functions with `dataclasses.replace(stage, run=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cf.memory import policy_knobs

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


@dataclass
class PlannedStage:
    """A stage planned for one config (`cf.pipeline.plan`): its cache hash and entry. The pipeline, its
    cache checks (`cf.stage_cache`) and its progress lines (`cf.progress`) all take it."""

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


def _section(cfg: DictConfig, name: str, drop: tuple[str, ...] = ()) -> dict:
    node = OmegaConf.to_container(cfg[name], resolve=True)
    return {k: v for k, v in node.items() if k not in drop}


def memory_knobs(cfg: DictConfig, policy: str) -> dict:
    """The memory.* values `policy` reads, as its Config declares them (memory.policy itself excluded)."""
    return policy_knobs(policy, cfg.memory)


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
    # (bench.memory applied: the inference policy, which may differ from the trained one)
    from cf.bench.entries import at_inference

    cfg = at_inference(cfg)
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
    from cf.bench.entries import Entry, at_inference

    generator = Path(inputs["generator"]).parent / "generator.safetensors"
    cfg = at_inference(cfg)
    run_consistency(cfg, [Entry(cfg, generator)], out_dir / "bench", parent_run_id=parent_run_id)
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
