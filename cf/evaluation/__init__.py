"""Evaluations: a trained model scored on held-out worlds, as library code (the stage runners in `cf.train`
log and write what these return; the CLI and notebooks can call them on any checkpoint).

    cf.evaluation.generator     a generator beside the untrained and undistilled students, the teacher
                                and the world: revisit retention, first-frame consistency, realism
    cf.evaluation.continuation  the teacher continuing held-out clips from long and short context
"""
