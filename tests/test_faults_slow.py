"""Faults on the real smoke pipeline (`make test-slow`): `cf ablate --preset smoke` killed with SIGKILL at
every stage boundary and mid-save, and at random moments; two of them at once on a new store; a full
disk; a damaged cache; a non-finite loss; a new store under a kept cache, then tables and notebooks.

Every resumed pipeline is compared with one uninterrupted run: the checkpoint of every stage, the
published generator and the benchmark's numbers must be equal. (They are: training and evaluation are
deterministic on the CPU, seeded per step, with the data stream resumed exactly. Timings are not
compared; neither are the sample videos' bytes nor eval.json, which carry wall-clock times.)

Each test prints its figures (trials, stages covered, lost stages, equal or not) on stdout (`-s`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cf import pipeline
from cf.config import load_config
from cf.utils import partial_files

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["teacher", "teacher_erft", "student", "cdmd1", "cdmd2", "bench"]
TRAINED = NAMES[:-1]


def cf(out: Path, *args: str, failpoint: str = "", wait: bool = True, store: Path | None = None):
    """`cf ablate --preset smoke --out <out>/runs` (or another command) in a subprocess: (returncode,
    stderr) when `wait`, else (the process, the file its stderr goes to)."""
    uri = f"sqlite:///{store or out / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CF_FAILPOINT": failpoint, "PYTHONPATH": str(ROOT)}
    args = args or ("ablate", "--preset", "smoke")
    cmd = [sys.executable, "-m", "cf.cli", *args, "--out", str(out / "runs")]
    err_path = out / f"stderr-{time.time_ns()}.txt"  # a file, not a pipe: nobody has to drain it
    with open(out / "log.txt", "a") as log, open(err_path, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=err)
    if not wait:
        return p, err_path
    p.wait(timeout=900)
    return p.returncode, err_path.read_text()


def planned(out: Path):
    return pipeline.plan(load_config("smoke", out=str(out / "runs")))


def done(out: Path) -> set[str]:
    return {ps.name for ps in planned(out) if ps.done}


def _digest(obj, h) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        h.update(str((obj.dtype, tuple(obj.shape))).encode())
        h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _digest(v, h)
    else:
        h.update(repr(obj).encode())


def state_digest(path: Path) -> str:
    """Digest of what a checkpoint holds for training (weights, EMA, optimizer, step), not of its bytes:
    they also carry the config as YAML, output folder included, which differs between two runs' dirs."""
    import hashlib

    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    _digest({k: ckpt.get(k) for k in ("global_step", "state_dict", "ema", "optimizer_states")}, h)
    return h.hexdigest()


def tensors_digest(path: Path) -> str:
    import hashlib

    from safetensors.torch import load_file

    h = hashlib.sha256()
    _digest(load_file(str(path)), h)
    return h.hexdigest()


def fingerprint(out: Path) -> dict:
    """What an uninterrupted run and a resumed one must agree on."""
    res = {}
    for ps in planned(out):
        if ps.name in TRAINED:
            res[ps.name] = state_digest(ps.dir / ps.name / "last.ckpt")
    dest = out / "runs" / "smoke" / "context_forcing-slowfast-seed0"
    res["generator"] = tensors_digest(dest / "generator.safetensors")
    bench = json.loads((dest / "bench" / "results" / "bench.json").read_text())["runs"][0]
    res["bench"] = {k: v for k, v in bench.items() if k not in ("generator", "fps", "ms_per_chunk")}
    return res


def running(out: Path, store: Path | None = None) -> list:
    c = MlflowClient(f"sqlite:///{store or out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("cf")
    return [] if exp is None else list(c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    rc, err = cf(out)
    assert rc == 0, err[-3000:]
    return out, fingerprint(out)


def test_kill_at_every_stage_boundary_and_mid_save_resumes_to_the_uninterrupted_result(reference, tmp_path):
    ref_out, ref = reference
    chain = []
    for name in NAMES:
        mid = ["ckpt.tmp_written"] if name in TRAINED else []  # the stage's first save, killed before rename
        chain += [f"stage.start:{name}", *mid, f"stage.ran:{name}", f"stage.done:{name}"]
    chain = ["store.created", "pipeline.parent_created", *chain, "pipeline.done"]  # the store is new
    before: set[str] = set()
    lost = 0
    t0 = time.time()
    for spec in chain:
        rc, err = cf(tmp_path, failpoint=spec)
        assert rc == -signal.SIGKILL, (spec, rc, err[-3000:])
        now = done(tmp_path)
        lost += len(before - now)
        before = now
    rc, err = cf(tmp_path)
    assert rc == 0, err[-3000:]
    assert lost == 0 and done(tmp_path) == set(NAMES)
    mine = fingerprint(tmp_path)
    assert partial_files(tmp_path / "runs") == [] and running(tmp_path) == []
    equal = {k: mine[k] == ref[k] for k in ref}
    print(f"\nkill chain: {len(chain)} SIGKILLs at {len(chain)} points over {len(NAMES)} stages, "
          f"{lost} stages lost, results equal to the uninterrupted run: {equal}, {time.time() - t0:.0f} s")
    assert mine == ref


def test_random_kills_then_resume_every_time(reference, tmp_path):
    ref_out, ref = reference
    rng = random.Random(18)
    trials, kills, lost = 3, 0, 0
    for trial in range(trials):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        before: set[str] = set()
        for attempt in range(20):
            p, err = cf(out, wait=False)
            try:  # ever longer: a stage longer than the first waits still gets done
                p.wait(timeout=rng.uniform(3.0, 30.0 + 15.0 * attempt))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
            assert p.returncode in (0, -signal.SIGKILL), err.read_text()[-3000:]
            now = done(out)
            lost += len(before - now)
            before = now
            if p.returncode == 0:
                break
        assert p.returncode == 0
        assert fingerprint(out) == ref and running(out) == [] and partial_files(out / "runs") == []
    print(f"\nrandom kills: {trials} pipelines, {kills} SIGKILLs at random times, {lost} stages lost, "
          "every result equal to the uninterrupted run")
    assert lost == 0


def test_two_pipelines_at_once_on_a_fresh_clone_both_finish(reference, tmp_path):
    ref_out, ref = reference
    tries = 2
    for i in range(tries):
        out = tmp_path / f"try{i}"
        out.mkdir()
        procs = [cf(out, wait=False) for _ in range(2)]
        for p, _ in procs:
            p.wait(timeout=900)
        assert [p.returncode for p, _ in procs] == [0, 0], [e.read_text()[-2000:] for _, e in procs]
        c = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        parents = c.search_runs([c.get_experiment_by_name("cf").experiment_id], "tags.stage = 'pipeline'")
        assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"] and running(out) == []
        assert fingerprint(out) == ref
    print(f"\ntwo at once on a new store: {tries}/{tries} tries, both finished, store usable")


def test_a_full_disk_mid_run_stops_in_one_line_and_resumes(reference, tmp_path):
    ref_out, ref = reference
    rc, err = cf(tmp_path, failpoint="ckpt.write@3:enospc")  # the third checkpoint finds the disk full
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith("cf: error: no space left on device")
    rc, err = cf(tmp_path)
    assert rc == 0, err[-3000:]
    assert fingerprint(tmp_path) == ref and running(tmp_path) == []


def test_a_damaged_cache_is_named_redone_and_publishes_a_generator_that_loads(reference, tmp_path):
    ref_out, ref = reference
    shutil.copytree(ref_out / "runs", tmp_path / "runs")
    ps = next(p for p in planned(tmp_path) if p.name == "cdmd2")
    for f in ("generator.safetensors", "last.ckpt"):  # half of each cut off
        path = ps.dir / "cdmd2" / f
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc, err = cf(tmp_path, store=ref_out / "mlflow.db")
    assert rc == 0, err[-3000:]
    assert f"cdmd2: the cached entry is damaged: {ps.dir / 'cdmd2'}" in err
    from cf.model import build_model

    build_model(load_config("smoke"), "cpu", weights=tmp_path / "runs" / "smoke" /
                "context_forcing-slowfast-seed0" / "generator.safetensors")
    assert fingerprint(tmp_path) == ref


def test_a_new_store_under_a_kept_cache_then_tables_and_notebooks(reference, tmp_path):
    ref_out, ref = reference
    shutil.copytree(ref_out / "runs", tmp_path / "runs")
    rc, err = cf(tmp_path)  # tmp_path/mlflow.db does not exist: a new store
    assert rc == 0, err[-3000:]
    cfg = load_config("smoke", overrides=[f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    from cf import curves, results

    assert results.write_tables(cfg, out=tmp_path / "results")
    assert set(curves.training_curves(cfg)["stage"]) == set(TRAINED)  # the stages with a loss
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = c.search_runs([c.get_experiment_by_name("cf").experiment_id], "tags.stage = 'pipeline'")
    for name in NAMES:  # every cached stage has its run in the new store, nested under the pipeline
        run = c.get_run(parent.data.tags[f"run.{name}"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # the notebook that reads the stage runs (what failed with `Run with id=... not found`)
    notebook = str(ROOT / "notebooks" / "training.ipynb")
    rc, err = cf(tmp_path, "notebooks", "--preset", "smoke", "--notebook", notebook, "--figures",
                 str(tmp_path / "figures"))
    assert rc == 0, err[-3000:]
    assert any((tmp_path / "figures").glob("training_smoke_*.png"))


def test_a_nonfinite_loss_in_a_real_stage_stops_keeps_its_checkpoint_and_fails_its_run(tmp_path):
    import torch
    from lightning.pytorch import Callback

    from cf import tracking
    from cf.train.base import ckpt_path, load_checkpoint
    from cf.train.callbacks import NonFiniteError
    from cf.train.teacher_stage import train_teacher

    class Poison(Callback):
        def on_train_batch_start(self, trainer, module, *args):
            if trainer.global_step == 3:
                with torch.no_grad():
                    next(module.parameters()).fill_(float("nan"))

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("smoke", overrides=[f"tracking.uri={db}"], out=str(tmp_path))
    with pytest.raises(NonFiniteError, match=r"teacher.*Lower trainer.lr \(now 0.001\)") as err:
        with tracking.start_run(cfg, "pipeline") as parent:
            train_teacher(cfg, tmp_path, callbacks=[Poison()])
    assert "last good checkpoint" in str(err.value)
    assert load_checkpoint(ckpt_path(tmp_path, "teacher"))["global_step"] == 2
    c = MlflowClient(db)
    runs = c.search_runs([c.get_experiment_by_name("cf").experiment_id])
    assert {r.data.tags["stage"]: r.info.status for r in runs} == {"pipeline": "FAILED", "teacher": "FAILED"}
    assert parent.run_id
