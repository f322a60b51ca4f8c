"""`cf train teacher`: the context teacher (video continuation by flow matching)."""

COMMAND = ("train", "teacher")
HELP = "train the context teacher; resumes from <out>/teacher/last.ckpt after a kill"


def run(args, cfg) -> int:
    from cf.train.teacher_stage import train_teacher

    path = train_teacher(cfg, cfg.out, "teacher")
    print(f"teacher checkpoint: {path}")
    return 0
