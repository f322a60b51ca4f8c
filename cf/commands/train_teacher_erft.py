"""`cf train teacher_erft`: Error-Recycling Fine-Tuning of the teacher, from its checkpoint."""

COMMAND = ("train", "teacher_erft")
HELP = "fine-tune the teacher with recycled errors (ERFT); starts from <out>/teacher/last.ckpt"


def run(args, cfg) -> int:
    from cf.train.teacher_stage import train_teacher

    path = train_teacher(cfg, cfg.out, "teacher_erft")
    print(f"teacher_erft checkpoint: {path}")
    return 0
