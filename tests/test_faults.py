"""Faults as tests, the fast core: kill -9 at every stage boundary and mid-stage, two identical pipelines
at once on a new store, a damaged cache, a store that lost the cache's runs, a non-finite loss, a full
disk. `tests/test_faults_errors.py` checks the one-line CLI error for every bad path and file, and
`tests/test_faults_slow.py` does all of it on the real smoke pipeline.

Kills are real SIGKILLs: a child process (forked from a forkserver that has imported cf and MLflow
already, so a child starts in milliseconds) runs a pipeline of toy stages with `$CF_FAILPOINT` set, and
`cf.faults.failpoint` kills it at the named point. Toy stages are deterministic, so a resumed pipeline
must end byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import multiprocessing
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cf import curves, pipeline, run_records, stage_cache, store, tracking
from cf.cli import main
from cf.config import load_config
from cf.faults import FAILPOINT_ENV, DiskFullError, failpoint, is_disk_full
from cf.filecheck import digest
from cf.utils import partial_files

NAMES = ["teacher", "teacher_erft", "student", "cdmd1", "cdmd2", "bench"]


def cfg_for(out: Path, uri: str | None = None, experiment: str = "faults", *overrides):
    track = [f"tracking.uri={uri}", f"tracking.experiment={experiment}"]
    track = track if uri else ["tracking.enabled=false"]
    return load_config("smoke", None, [*track, *overrides], out=str(out))


# --- toy stages: deterministic, logging to MLflow, with a mid-stage failpoint ---------------------


def toy_stage(name: str):
    def run(cfg, out_dir, inputs, parent_run_id):
        d = Path(out_dir) / name
        d.mkdir(parents=True, exist_ok=True)
        ckpt = d / ("state.json" if name == "bench" else "last.ckpt")  # the bench has no checkpoint
        log = Path(cfg.out) / "calls.log"
        resumed = ckpt.is_file()  # partial (killed mid-stage) or complete (killed before done.json)
        with open(log, "a") as f:
            f.write(f"{name} {'resume' if resumed else 'start'}\n")
        chain = {role: json.loads(Path(p).read_text())["chain"] for role, p in sorted(inputs.items())}
        with tracking.start_run(cfg, name, parent_run_id=parent_run_id):
            if not resumed:
                ckpt.write_text(json.dumps({"partial": True, "chain": None}))
                tracking.log_metrics({f"{name}/loss": 1.0}, step=1)
                failpoint(f"toy.mid:{name}")
            tracking.log_metrics({f"{name}/loss": 0.5}, step=2)
            (d / "eval.json").write_text(json.dumps({"stage": name}))
            tracking.log_artifact(d / "eval.json")
            ckpt.write_text(json.dumps({"partial": False, "chain": {name: chain}}))
            if name.startswith("cdmd"):
                (d / "generator.safetensors").write_text(f"weights of {name}: {json.dumps(chain)}")
            if name == "bench":
                (d / "table.md").write_text(f"bench of {json.dumps(chain)}")
        with open(log, "a") as f:
            f.write(f"{name} done\n")
        return ckpt if name != "bench" else d

    return run


TOY = tuple(dataclasses.replace(s, run=toy_stage(s.name)) for s in pipeline.STAGES)


def calls(out: Path) -> list[str]:
    log = out / "calls.log"
    return log.read_text().splitlines() if log.is_file() else []


def run_toy(out: Path, uri: str | None = None, experiment: str = "faults", stream=None):
    return pipeline.run_pipeline(cfg_for(out, uri, experiment), TOY, stream=stream or io.StringIO())


def _child(out: str, uri: str | None, experiment: str, spec: str) -> None:
    os.environ[FAILPOINT_ENV] = spec
    with open(Path(out) / "child.log", "a") as log:
        run_toy(Path(out), uri, experiment, stream=log)


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["cf.pipeline", "cf.store", "mlflow.tracking", "test_faults"])
    return ctx


def spawn(ctx, out: Path, uri: str | None, experiment: str, spec: str = ""):
    p = ctx.Process(target=_child, args=(str(out), uri, experiment, spec))
    p.start()
    return p


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def outputs(runs: Path) -> dict[str, str]:
    """Digest of every published file and every live cache entry's outputs (what must equal a clean run)."""
    res = {}
    for p in sorted([*(runs / "cache").rglob("*"), *(runs / "smoke").rglob("*")]):
        rel = p.relative_to(runs)
        aside = ".damaged-" in str(rel) or ".stale-" in str(rel)
        if p.is_file() and not aside and p.name not in (
            ".lock", ".pipeline.lock", "pipeline.json", "done.json", "stage.json", "mlflow_run.json"
        ):
            res[str(rel)] = digest(p)
    return res


def running(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else list(c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"))


# --- kill -9 -------------------------------------------------------------------------------------

# In execution order, so each rerun gets past the previous kill and dies at the next one: every stage
# at its boundaries (started, trained, marked done) and mid-stage, and the pipeline's own moments.
CHAIN = ["pipeline.locked", "store.created", "pipeline.parent_created"] + [
    f"{point}:{name}" for name in NAMES for point in ("stage.start", "toy.mid", "stage.ran", "stage.done")
] + ["pipeline.done"]
FAST_CHAIN = ["store.created", "pipeline.parent_created", "stage.start:teacher", "toy.mid:teacher_erft",
              "stage.ran:student", "stage.done:cdmd1", "toy.mid:cdmd2", "stage.start:bench", "pipeline.done"]


def kill_chain(forkserver, tmp_path, db, chain, experiment):
    """Run the toy pipeline killed at each point of `chain` in turn, then to the end (store `db`)."""
    ref = tmp_path / "ref"
    run_toy(ref / "runs")
    out = tmp_path / "killed"
    (out / "runs").mkdir(parents=True)
    done_before: set[str] = set()
    for spec in chain:
        p = spawn(forkserver, out / "runs", db, experiment, spec)
        p.join(60)
        assert p.exitcode == -9, (spec, p.exitcode, (out / "runs" / "child.log").read_text()[-2000:])
        for f in (out / "runs").rglob("*.json"):
            assert f.stat().st_size > 0 and json.loads(f.read_text()) is not None, f  # nothing half-written
        done_now = {ps.name for ps in pipeline.plan(cfg_for(out / "runs", db, experiment)) if ps.done}
        assert done_before <= done_now, f"a kill at {spec} lost stage(s) {done_before - done_now}"
        done_before = done_now
    p = spawn(forkserver, out / "runs", db, experiment)
    p.join(60)
    assert p.exitcode == 0, (out / "runs" / "child.log").read_text()[-2000:]
    return ref, out


def test_kill_at_stage_boundaries_and_mid_stage_then_resume(forkserver, tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a new store: the first kill lands while it is created
    ref, out = kill_chain(forkserver, tmp_path, db, FAST_CHAIN, "chain")
    # no stage trained twice: each ran once, or was resumed once after its mid-stage kill
    log = calls(out / "runs")
    for name in NAMES:
        assert log.count(f"{name} done") == 1 + (f"stage.ran:{name}" in FAST_CHAIN), (name, log)
    resumes = ["teacher_erft resume", "student resume", "cdmd2 resume"]  # mid-stage, or after training
    assert [line for line in log if line.endswith("resume")] == resumes
    # the resumed pipeline ends exactly as an uninterrupted one
    assert outputs(out / "runs") == outputs(ref / "runs")
    assert partial_files(out / "runs") == [] and not list(tmp_path.glob(".mlflow.db.creating-*"))
    # no run is left RUNNING, whatever the moment of the kill (even before pipeline.json named it)
    assert running(db, "chain") == []
    c = MlflowClient(db)
    exp = c.get_experiment_by_name("chain").experiment_id
    parents = c.search_runs([exp], "tags.stage = 'pipeline'")
    # closed: the run killed before pipeline.json named it, and the one killed after pipeline.json said
    # complete (the rerun is a new run); the kills in between resumed one run, FINISHED at last
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED", "KILLED"]


@pytest.mark.slow
def test_kill_at_every_point_of_every_stage_then_resume(forkserver, tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ref, out = kill_chain(forkserver, tmp_path, db, CHAIN, "chain")
    assert outputs(out / "runs") == outputs(ref / "runs") and running(db, "chain") == []
    print(f"\ntoy kill chain: {len(CHAIN)} SIGKILLs over {len(NAMES)} stages, 0 stages lost, outputs equal")


def test_two_identical_pipelines_at_once_on_a_new_store_both_finish(forkserver, tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"  # no store yet: all three race to create it
    out = tmp_path / "runs"
    out.mkdir()
    procs = [spawn(forkserver, out, uri, "twins") for _ in range(2)]
    procs.append(forkserver.Process(target=store.ensure_store, args=(uri,)))  # and a third opener
    procs[-1].start()
    for p in procs:
        p.join(120)
    log = (out / "child.log").read_text()
    assert [p.exitcode for p in procs] == [0, 0, 0], log[-3000:]
    assert "waiting for another pipeline writing the same run folder" in log
    assert [line for line in calls(out) if line.endswith("done")] == [f"{n} done" for n in NAMES]  # once each
    c = MlflowClient(uri)  # the store works afterwards
    parents = c.search_runs([c.get_experiment_by_name("twins").experiment_id], "tags.stage = 'pipeline'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    assert running(uri, "twins") == []


# --- the verified cache --------------------------------------------------------------------------


def test_a_damaged_cache_entry_is_named_moved_aside_and_redone(tmp_path, capsys):
    out = tmp_path / "runs"
    first = run_toy(out)
    ref = outputs(out)
    entry = next(p for p in first.stages if p.name == "cdmd2").dir
    gen = entry / "cdmd2" / "generator.safetensors"
    gen.write_text(gen.read_text()[: len(gen.read_text()) // 2])  # cut in half
    assert main(["ablate", "--plan", "--preset", "smoke", "--out", str(out), "tracking.enabled=false"]) == 0
    plan = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "damaged, will redo" in plan["cdmd2"] and f"({gen} is" in plan["cdmd2"]
    assert plan["cdmd1"].split()[1] == "done" and plan["bench"].split()[1] == "done"
    text = io.StringIO()
    res = pipeline.run_pipeline(cfg_for(out), TOY, stream=text)
    msg = text.getvalue()
    assert f"cdmd2: the cached entry is damaged: {gen} is" in msg and "Moved it aside to" in msg
    assert res.ran == ["cdmd2"]  # redone; the bench downstream read an identical checkpoint, so it stays
    aside = [p for p in entry.parent.iterdir() if p.name.startswith(entry.name + ".damaged-")]
    assert len(aside) == 1  # the user's copy, as it was
    assert (aside[0] / "cdmd2" / "generator.safetensors").stat().st_size < gen.stat().st_size
    assert "cdmd2 resume" in calls(out)  # its last.ckpt still verified: it was kept, not retrained
    assert outputs(out) == ref


def test_same_size_damage_is_caught_by_the_hash_and_a_stale_downstream_is_redone(tmp_path):
    out = tmp_path / "runs"
    first = run_toy(out)
    by = {p.name: p for p in first.stages}
    ckpt = by["cdmd1"].dir / "cdmd1" / "last.ckpt"
    ckpt.write_text(ckpt.read_text().replace('"student"', '"studenT"'))  # same size, other content
    bad = stage_cache.problem(by["cdmd1"], json.loads(by["cdmd1"].marker.read_text()), {})
    assert bad == ("damaged", f"{ckpt} does not hash to what the stage wrote (its bytes changed)")
    # as if cdmd1 had been redone since, giving other weights: all that was trained from the old is stale
    doc = json.loads(by["cdmd1"].marker.read_text())
    doc["files"]["cdmd1/last.ckpt"]["sha256"] = digest(ckpt)
    doc["files"]["cdmd1/last.ckpt"]["size"] = ckpt.stat().st_size
    by["cdmd1"].marker.write_text(json.dumps(doc))
    text = io.StringIO()
    res = pipeline.run_pipeline(cfg_for(out), TOY, stream=text)
    stale = "cdmd2: the cached entry is stale: its init checkpoint from stage cdmd1 was redone"
    assert stale in text.getvalue()
    assert res.ran == ["cdmd2", "bench"]


def test_a_damaged_published_file_is_reported_and_published_again(tmp_path, capsys):
    out = tmp_path / "runs"
    res = run_toy(out)
    published = res.run_dir / "generator.safetensors"
    good = published.read_bytes()
    published.write_bytes(good[:-3] + b"xyz")
    assert main(["ablate", "--plan", "--preset", "smoke", "--out", str(out), "tracking.enabled=false"]) == 0
    assert f"will publish again {res.run_dir} ({published} differs" in capsys.readouterr().out
    run_toy(out)
    assert published.read_bytes() == good


def test_temp_files_of_interrupted_writes_are_cleaned_before_a_stage_runs(tmp_path):
    out = tmp_path / "runs"
    ps = next(p for p in pipeline.plan(cfg_for(out)) if p.name == "teacher")
    (ps.dir / "teacher").mkdir(parents=True)
    junk = [ps.dir / ".done.json.partial-abcd1234.json", ps.dir / "teacher" / ".eval.json.k2j3h4g5.json"]
    for f in junk:
        f.write_text("{")
    run_toy(out)
    assert not any(f.exists() for f in junk) and partial_files(out / "cache") == []


# --- the store and the cache agree ---------------------------------------------------------------


def test_a_new_store_gets_the_cached_stage_runs_recorded_again(tmp_path, db, capfd):
    out = tmp_path / "runs"
    new = f"sqlite:///{tmp_path / 'new.db'}"
    run_toy(out, db, "x")
    # an entry cached before records existed: no file records, no MLflow record
    ps = next(p for p in pipeline.plan(cfg_for(out, new, "x")) if p.name == "bench")
    legacy = {k: v for k, v in json.loads(ps.marker.read_text()).items() if k not in ("files", "inputs")}
    ps.marker.write_text(json.dumps(legacy))
    (ps.dir / run_records.RECORD_FILE).unlink()
    res = run_toy(out, new, "x")
    assert res.ran == []  # all cached
    c = MlflowClient(new)
    parent = c.get_run(res.parent_run_id)
    for name in NAMES:
        run = c.get_run(parent.data.tags[f"run.{name}"])  # recorded in the new store, nested here
        assert run.data.tags["mlflow.parentRunId"] == res.parent_run_id and run.info.status == "FINISHED"
        assert run.data.tags["stage"] == name and run.data.params["memory.policy"] == "slowfast"
        history = [m.value for m in c.get_metric_history(run.info.run_id, f"{name}/loss")]
        assert history == ([0.5] if name == "bench" else [1.0, 0.5])  # the legacy entry: final values
        logged = ["eval.json", "state.json", "table.md"] if name == "bench" else ["eval.json"]  # legacy: all
        assert [a.path for a in c.list_artifacts(run.info.run_id)] == logged
    assert json.loads(ps.marker.read_text())["files"]  # the legacy entry is recorded now
    # a second run in the new store finds them there: nothing is recorded twice
    again = run_toy(out, new, "x")
    assert c.get_run(again.parent_run_id).data.tags["run.teacher"] == parent.data.tags["run.teacher"]
    # tables and notebooks read the pipeline from the new store
    cfg = cfg_for(out, new, "x")
    hist = curves.training_curves(cfg)
    assert sorted(set(hist["stage"])) == sorted(NAMES)
    # a reader that meets a run the store does not have skips it and says which
    c.set_tag(again.parent_run_id, "run.cdmd1", "0123456789abcdef0123456789abcdef")
    capfd.readouterr()
    hist = curves.training_curves(cfg)
    assert "training curves: skipping cdmd1" in capfd.readouterr().err
    assert "cdmd1" not in set(hist["stage"]) and "cdmd2" in set(hist["stage"])


# --- non-finite loss and full disk on a real (toy) Lightning training ----------------------------


def test_a_nonfinite_loss_stops_keeps_the_checkpoint_marks_the_run_failed_and_names_the_right_rates(
    tmp_path, db
):
    from test_train_base import Toy, ToyData, toy_cfg

    from cf.train.base import ckpt_path, fit, load_checkpoint, make_trainer
    from cf.train.callbacks import NonFiniteError
    from cf.train.recovery import nonfinite_hint

    cfg = toy_cfg("tracking.enabled=true", f"tracking.uri={db}", "tracking.experiment=nan")
    with pytest.raises(NonFiniteError) as err:
        with tracking.start_run(cfg, "cdmd1") as run:
            fit(make_trainer(cfg, tmp_path, "cdmd1"), Toy(cfg, nan_at=5), ToyData(), tmp_path, "cdmd1")
    msg = str(err.value)
    assert "Lower cdmd.generator_lr (now 0.0002) and cdmd.critic_lr (now 0.0002)" in msg
    assert "trainer.lr" not in msg and "last good checkpoint is kept" in msg
    assert load_checkpoint(ckpt_path(tmp_path, "cdmd1"))["global_step"] == 3
    assert MlflowClient(db).get_run(run.run_id).info.status == "FAILED"
    assert nonfinite_hint(cfg, "teacher").startswith("Lower trainer.lr (now 0.01)")
    assert nonfinite_hint(cfg, "student").startswith("Lower student.lr (now 0.0002)")


def test_a_full_disk_mid_save_stops_cleanly_and_resumes_exactly(tmp_path, monkeypatch):
    from test_train_base import assert_same_training, toy_cfg, train

    from cf.train.base import ckpt_path, load_checkpoint

    ref = train(toy_cfg(), tmp_path / "ref")
    monkeypatch.setenv(FAILPOINT_ENV, "ckpt.write@2:enospc")  # the second save finds the disk full
    full = r"no space left on device while writing '.*/toy/last.ckpt'"
    with pytest.raises(DiskFullError, match=full) as err:
        train(toy_cfg(), tmp_path / "full")
    assert is_disk_full(err.value) and err.value.__cause__.errno == errno.ENOSPC
    assert load_checkpoint(ckpt_path(tmp_path / "full", "toy"))["global_step"] == 3  # the first save
    assert partial_files(tmp_path / "full") == []
    monkeypatch.delenv(FAILPOINT_ENV)  # space is back
    assert_same_training(ref, train(toy_cfg(), tmp_path / "full"))


def _save_then_die(out: str) -> None:
    from test_train_base import toy_cfg, train

    os.environ[FAILPOINT_ENV] = "ckpt.tmp_written@2"  # killed between writing the save and renaming it
    train(toy_cfg(), Path(out))


def test_a_kill_mid_save_resumes_from_that_save_and_leaves_no_temp_file(forkserver, tmp_path, capfd):
    from test_train_base import assert_same_training, toy_cfg, train

    from cf.train.base import ckpt_path, load_checkpoint

    p = forkserver.Process(target=_save_then_die, args=(str(tmp_path),))
    p.start()
    p.join(60)
    assert p.exitcode == -9
    last = ckpt_path(tmp_path, "toy")
    temps = [f for f in partial_files(tmp_path) if f.name.startswith(".last.ckpt.")]
    assert load_checkpoint(last)["global_step"] == 3 and len(temps) == 1  # the step-6 save, not renamed
    resumed = train(toy_cfg(), tmp_path)
    assert "recovered from the complete save a kill left" in capfd.readouterr().err
    assert partial_files(tmp_path) == []
    assert_same_training(train(toy_cfg(), tmp_path / "ref"), resumed)


def test_a_truncated_last_checkpoint_is_a_clean_error_naming_it(tmp_path):
    from test_train_base import toy_cfg, train

    from cf.errors import CfError
    from cf.train.base import ckpt_path

    train(toy_cfg("trainer.max_steps=4"), tmp_path)
    last = ckpt_path(tmp_path, "toy")
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CfError, match=rf"cannot resume stage toy from '{last}': it is truncated.*mv {last}"):
        train(toy_cfg(), tmp_path)
