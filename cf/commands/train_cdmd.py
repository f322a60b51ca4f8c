"""`cf train cdmd --stage 1|2`: contextual DMD (stage 1: Self-Forcing; stage 2: long rollouts)."""

COMMAND = ("train", "cdmd")
HELP = "distil the student by contextual DMD (--stage 1 short rollouts, 2 long); resumes after a kill"


def add_arguments(p) -> None:
    p.add_argument(
        "--stage",
        type=int,
        choices=(1, 2),
        required=True,
        help="1: short self-rollouts (Self-Forcing); 2: long rollouts, teacher and critic read the "
        "student's history (needs cdmd.stage2=true)",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint (default: <out>/teacher_erft/last.ckpt when erft.enabled, "
        "else <out>/teacher/last.ckpt)",
    )
    p.add_argument(
        "--init",
        default=None,
        help="generator to start from, a .ckpt or generator.safetensors (default: "
        "<out>/student/last.ckpt for stage 1, <out>/cdmd1/last.ckpt for stage 2)",
    )


def run(args, cfg) -> int:
    from pathlib import Path

    from cf.commands.train_student import default_teacher
    from cf.train.student_stage import GENERATOR_FILE, train_cdmd

    init = args.init or str(Path(cfg.out) / ("student" if args.stage == 1 else "cdmd1") / "last.ckpt")
    path = train_cdmd(cfg, cfg.out, args.stage, args.teacher or default_teacher(cfg), init)
    print(f"cdmd{args.stage} checkpoint: {path} (generator: {path.parent / GENERATOR_FILE})")
    return 0
