"""Every role's memory policy, built once from the config and handed to the code that reads through it.

    student  memory.policy: the generator's memory (student rollouts, CDMD, evaluation)
    teacher  teacher.memory: how the teacher reads its history, in training and when it makes
             the student's ODE targets; its other knobs are memory.*'s
    score    how the CDMD teacher and critic read the generated history: the student's policy
             (`cdmd.teacher_history=policy`, the paper), or a sliding window of the whole chunks of
             `teacher.context_frames` before each chunk (`window`: a short, memoryless teacher, as in
             LongLive and the released Context Forcing code, which feeds its teacher the last 21 latents)
    score_reach  how many frames before a chunk the score reading can reach (None: the whole history)
"""

from __future__ import annotations

from dataclasses import dataclass

from cf.memory import MemoryPolicy, build_policy


@dataclass(frozen=True)
class Memories:
    student: MemoryPolicy
    teacher: MemoryPolicy
    score: MemoryPolicy
    score_reach: int | None

    @classmethod
    def from_config(cls, cfg) -> Memories:
        chunk = cfg.model.frames_per_chunk
        student = build_policy(cfg.memory, chunk)
        if cfg.cdmd.teacher_history == "policy":
            score, reach = student, None
        else:
            reach = (cfg.teacher.context_frames // chunk) * chunk
            score = build_policy(cfg.memory, chunk, policy="sliding", window_frames=reach + chunk)
        return cls(student=student, teacher=build_policy(cfg.memory, chunk, policy=cfg.teacher.memory),
                   score=score, score_reach=reach)
