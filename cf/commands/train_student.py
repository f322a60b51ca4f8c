"""`cf train student`: the few-step student fitted to the teacher's ODE trajectories."""

COMMAND = ("train", "student")
HELP = "initialise the few-step student from the teacher's ODE trajectories; resumes after a kill"


def add_arguments(p) -> None:
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint (default: <out>/teacher_erft/last.ckpt when erft.enabled, "
        "else <out>/teacher/last.ckpt)",
    )


def default_teacher(cfg) -> str:
    from pathlib import Path

    return str(Path(cfg.out) / ("teacher_erft" if cfg.erft.enabled else "teacher") / "last.ckpt")


def run(args, cfg) -> int:
    from cf.train.student_stage import GENERATOR_FILE, train_student

    path = train_student(cfg, cfg.out, args.teacher or default_teacher(cfg))
    print(f"student checkpoint: {path} (generator: {path.parent / GENERATOR_FILE})")
    return 0
