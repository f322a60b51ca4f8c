"""The pipeline: stage hashing (what invalidates what), the cache, resume after a kill, publishing,
the MLflow parent run, the progress line. Toy stages stand in for training except in the slow test."""

import dataclasses
import io
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cf import pipeline, tracking
from cf.config import load_config
from cf.errors import CfError
from cf.memory import POLICIES, build_policy

NAMES = ["teacher", "teacher_erft", "student", "cdmd1", "cdmd2", "bench"]


def cfg_for(tmp_path, *overrides, method=None, store=None):
    """A smoke config writing under tmp_path; tracking only when given a (uri, experiment) store."""
    base = [f"tracking.enabled={str(store is not None).lower()}"]
    if store is not None:
        base += [f"tracking.uri={store[0]}", f"tracking.experiment={store[1]}"]
    return load_config("smoke", method, [*base, *overrides], out=str(tmp_path / "runs"))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One sqlite store for the module (creating one costs ~2 s of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def store(db, request):
    return db, request.node.name  # one experiment per test


def keys(cfg, stages=pipeline.STAGES):
    return {ps.name: ps.key for ps in pipeline.plan(cfg, stages)}


# --- hashing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, first",
    [
        ("model.depth=3", "teacher"),
        ("data.camera_speed=3.0", "teacher"),
        ("teacher.context_frames=2", "teacher"),
        ("erft.steps=3", "teacher_erft"),
        ("student.steps=3", "student"),
        ("memory.policy=sliding", "student"),
        ("memory.tau=0.5", "student"),  # slowfast reads tau
        ("memory.promotion=uniform", "student"),
        ("diffusion.student_shift=3.0", "student"),
        ("cdmd.stage1_steps=3", "cdmd1"),
        ("cdmd.stage2_steps=3", "cdmd2"),
        ("cdmd.teacher_history=window", "cdmd1"),
        ("cdmd.long_chunks_end=5", "cdmd2"),
        ("bench.seconds=5.0", "bench"),
        ("trainer.log_every=7", None),
        ("trainer.ckpt_every=7", None),
        ("tracking.experiment=other", None),
        ("bench.policies=[full,sliding]", None),
    ],
)
def test_a_change_invalidates_its_stage_and_those_after_it_only(tmp_path, override, first):
    before = keys(cfg_for(tmp_path))
    after = keys(cfg_for(tmp_path, override))
    assert list(before) == NAMES
    cut = NAMES.index(first) if first else len(NAMES)
    for i, name in enumerate(NAMES):
        assert (before[name] != after[name]) == (i >= cut), (override, name)


def test_memory_policy_change_keeps_the_teacher_through_teacher_memory(tmp_path):
    slowfast, sliding = keys(cfg_for(tmp_path)), keys(cfg_for(tmp_path, "memory.policy=sliding"))
    assert slowfast["teacher"] == sliding["teacher"] and slowfast["teacher_erft"] == sliding["teacher_erft"]
    # teacher.memory=full reads no memory knob; a sliding teacher reads the window and nothing else
    assert keys(cfg_for(tmp_path, "memory.window_frames=6"))["teacher"] == slowfast["teacher"]
    # a student on a sliding window ignores the slow-memory knobs too
    sliding_tau = keys(cfg_for(tmp_path, "memory.policy=sliding", "memory.tau=0.5"))
    assert sliding_tau == sliding
    t_sliding = keys(cfg_for(tmp_path, "teacher.memory=sliding"))["teacher"]
    assert t_sliding != slowfast["teacher"]
    assert keys(cfg_for(tmp_path, "teacher.memory=sliding", "memory.window_frames=6"))["teacher"] != t_sliding
    # a sliding window reads memory.bounded_positions (a shift rotary attention sees only as rounding)
    assert (
        keys(cfg_for(tmp_path, "teacher.memory=sliding", "memory.bounded_positions=false"))["teacher"]
        != t_sliding
    )
    assert (
        keys(cfg_for(tmp_path, "teacher.memory=slowfast", "memory.tau=0.5"))["teacher"]
        != keys(cfg_for(tmp_path, "teacher.memory=slowfast"))["teacher"]
    )


def _changed(value):
    """Another valid value of a memory knob of this type."""
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 2)
    if isinstance(value, float):
        return str(value / 2)
    return {"similarity": "uniform", "uniform": "similarity"}[value]


@pytest.mark.parametrize("role, stage", [("memory.policy", "student"), ("teacher.memory", "teacher")])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_each_declared_knob_is_in_the_stage_hash_and_nothing_else(tmp_path, role, stage, policy):
    """The hash holds exactly the knobs the policy's Config declares: changing one re-runs the stage,
    changing any other memory.* value (one the policy never reads) reuses it."""
    cfg = cfg_for(tmp_path, f"{role}={policy}")
    base = keys(cfg)[stage]
    declared = {f.name for f in dataclasses.fields(POLICIES.get(policy).Config)}
    for knob, value in cfg.memory.items():
        if knob == "policy":
            continue
        changed = keys(cfg_for(tmp_path, f"{role}={policy}", f"memory.{knob}={_changed(value)}"))[stage]
        assert (changed != base) == (knob in declared), (policy, knob)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_policy_reads_only_the_knobs_it_declares(policy):
    """Built from a memory section that refuses every undeclared attribute: a policy reading a knob it
    does not declare (which the stage hash would then miss) fails here."""
    mem = load_config("smoke", None, [f"memory.policy={policy}"]).memory
    declared = {f.name for f in dataclasses.fields(POLICIES.get(policy).Config)}

    class Guarded:
        def __getattr__(self, name):
            if name not in declared | {"policy"}:
                raise AssertionError(f"{policy} read memory.{name}, which its Config does not declare")
            return mem[name]

    built = build_policy(Guarded(), 2)
    assert built.name == policy and dataclasses.asdict(built.config) == {k: mem[k] for k in declared}


def test_disabled_stages_drop_out_and_the_inputs_rewire(tmp_path):
    sf = pipeline.plan(cfg_for(tmp_path, method="self_forcing"))
    assert [p.name for p in sf] == ["teacher", "student", "cdmd1", "bench"]
    by = {p.name: p for p in sf}
    assert by["student"].inputs == {"teacher": "teacher"}
    assert by["cdmd1"].inputs == {"teacher": "teacher", "init": "student"}
    assert by["bench"].inputs == {"generator": "cdmd1"}
    cf_ = {p.name: p for p in pipeline.plan(cfg_for(tmp_path))}
    assert cf_["student"].inputs == {"teacher": "teacher_erft"} and cf_["bench"].inputs == {
        "generator": "cdmd2"
    }
    # both baselines train the same short, plain teacher: one cache entry serves both
    ll = keys(cfg_for(tmp_path, method="longlive"))
    assert ll["teacher"] == by["teacher"].key and ll["student"] != by["student"].key
    # at smoke every teacher sees 4 frames, so all three methods share it; at tiny the context
    # teacher sees 16 and is its own
    assert cf_["teacher"].key == by["teacher"].key
    tiny = {
        m: keys(load_config("tiny", m, out=str(tmp_path)))["teacher"]
        for m in ("context_forcing", "self_forcing")
    }
    assert tiny["context_forcing"] != tiny["self_forcing"]


def test_a_stage_whose_input_is_disabled_is_a_clear_error(tmp_path):
    stages = tuple(
        dataclasses.replace(s, inputs=lambda cfg: {"init": "teacher_erft"}) if s.name == "student" else s
        for s in pipeline.STAGES
    )
    with pytest.raises(CfError, match=r"'student' takes its 'init' checkpoint from stage 'teacher_erft'"):
        pipeline.plan(cfg_for(tmp_path, "erft.enabled=false"), stages)


def test_only_the_methods_own_config_owns_the_canonical_run_dir(tmp_path):
    assert pipeline.canonical_label(cfg_for(tmp_path, "memory.policy=full")) is None
    assert pipeline.canonical_label(cfg_for(tmp_path, "seed=3")) is None
    assert pipeline.canonical_label(cfg_for(tmp_path, method="longlive")) is None
    label = pipeline.canonical_label(cfg_for(tmp_path, "erft.enabled=false"))
    assert label is not None and label.startswith("cfg")
    assert pipeline.canonical_label(cfg_for(tmp_path, "trainer.log_every=9")) is None  # not a result
    cfg = cfg_for(tmp_path, "seed=2", "memory.policy=sink")
    assert pipeline.run_dir(cfg) == Path(cfg.out) / "smoke" / "context_forcing-sink-seed2"
    assert pipeline.run_dir(cfg, "erft-off").name == "context_forcing-sink-seed2-erft-off"


# --- running on toy stages ----------------------------------------------------------------------


class Toy:
    """Stand-in stage functions: each writes `<out>/<stage>/last.ckpt` holding the chain of its inputs,
    counts its calls, optionally dies once after writing a partial checkpoint, and logs a metric."""

    def __init__(self, die_in=()):
        self.calls: list[str] = []
        self.resumed: list[str] = []
        self.die_in = set(die_in)

    def fn(self, name):
        def run(cfg, out_dir, inputs, parent_run_id):
            self.calls.append(name)
            d = Path(out_dir) / name
            d.mkdir(parents=True, exist_ok=True)
            ckpt = d / "last.ckpt"
            if ckpt.is_file() and json.loads(ckpt.read_text())["partial"]:
                self.resumed.append(name)
            chain = {role: json.loads(Path(p).read_text())["chain"] for role, p in sorted(inputs.items())}
            if name in self.die_in:
                self.die_in.discard(name)
                ckpt.write_text(json.dumps({"partial": True, "chain": None}))
                raise KeyboardInterrupt  # what a kill looks like to the caller
            ckpt.write_text(json.dumps({"partial": False, "chain": {name: chain}}))
            if name.startswith("cdmd"):
                (d / "generator.safetensors").write_text(f"weights of {name} for {cfg.memory.policy}")
            if name == "bench":
                (d / "table.md").write_text(f"bench of {inputs['generator']}")
            with tracking.start_run(cfg, name, parent_run_id=parent_run_id):
                metric = "teacher/psnr" if name.startswith("teacher") else f"{name.rstrip('12')}/score"
                tracking.log_metrics({metric: float(len(self.calls))}, step=1)
            return ckpt if name != "bench" else d

        return run

    def stages(self, table=pipeline.STAGES):
        return tuple(dataclasses.replace(s, run=self.fn(s.name)) for s in table)


def test_a_killed_pipeline_resumes_skipping_finished_stages(tmp_path):
    cfg = cfg_for(tmp_path)
    toy = Toy(die_in={"cdmd1"})
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, toy.stages(), stream=out)
    planned = {p.name: p for p in pipeline.plan(cfg)}
    assert [n for n in NAMES if planned[n].done] == ["teacher", "teacher_erft", "student"]
    assert not (pipeline.run_dir(cfg) / "generator.safetensors").exists()  # nothing published half-way
    assert toy.calls == ["teacher", "teacher_erft", "student", "cdmd1"]

    toy.calls.clear()
    res = pipeline.run_pipeline(cfg, toy.stages(), stream=out)
    assert toy.calls == ["cdmd1", "cdmd2", "bench"] and toy.resumed == ["cdmd1"]
    assert res.ran == ["cdmd1", "cdmd2", "bench"]
    # each stage got its upstream checkpoints: the final one carries the whole chain
    gen = json.loads(res.checkpoint("cdmd2").read_text())["chain"]
    teacher = {"teacher_erft": {"init": {"teacher": {}}}}
    assert gen == {
        "cdmd2": {
            "init": {"cdmd1": {"init": {"student": {"teacher": teacher}}, "teacher": teacher}},
            "teacher": teacher,
        }
    }
    dest = pipeline.run_dir(cfg)
    assert (dest / "generator.safetensors").read_text() == "weights of cdmd2 for slowfast"
    assert (dest / "bench" / "table.md").read_text() == f"bench of {res.checkpoint('cdmd2')}"
    state = json.loads((dest / "pipeline.json").read_text())
    assert state["complete"] and state["ran"] == ["cdmd1", "cdmd2", "bench"]
    assert state["stages"] == {p.name: p.key for p in planned.values()}
    marker = json.loads(planned["cdmd1"].marker.read_text())
    assert marker["resumed"] is True and marker["checkpoint"] == "cdmd1/last.ckpt"

    toy.calls.clear()
    assert pipeline.run_pipeline(cfg, toy.stages(), stream=out).ran == [] and toy.calls == []
    lines = out.getvalue().splitlines()
    assert any("cdmd1 resuming in" in line for line in lines)
    assert lines[-1].startswith("[context_forcing-slowfast-seed0 ###### 6/6] all stages done")


def test_a_second_memory_policy_reuses_the_teacher_and_publishes_beside_the_first(tmp_path):
    toy = Toy()
    first = pipeline.run_pipeline(cfg_for(tmp_path), toy.stages(), stream=io.StringIO())
    second = pipeline.run_pipeline(
        cfg_for(tmp_path, "memory.policy=sliding"), toy.stages(), stream=io.StringIO()
    )
    assert first.ran == NAMES and second.ran == ["student", "cdmd1", "cdmd2", "bench"]
    assert second.checkpoint("teacher_erft") == first.checkpoint("teacher_erft")
    assert (second.run_dir / "generator.safetensors").read_text() == "weights of cdmd2 for sliding"
    assert (first.run_dir / "generator.safetensors").read_text() == "weights of cdmd2 for slowfast"
    # stage 2 off: cdmd1's generator is the final one, in a suffixed dir (not the method's own config)
    cfg = cfg_for(tmp_path, "cdmd.stage2=false")
    third = pipeline.run_pipeline(
        cfg, toy.stages(), label=pipeline.canonical_label(cfg), stream=io.StringIO()
    )
    assert third.ran == ["bench"] and third.run_dir != first.run_dir
    assert (third.run_dir / "generator.safetensors").read_text() == "weights of cdmd1 for slowfast"


def test_a_stage_that_does_not_write_what_is_published_is_a_clear_error(tmp_path):
    toy = Toy()
    stages = tuple(
        dataclasses.replace(s, publish=(("cdmd2/missing.bin", "x.bin"),)) if s.name == "cdmd2" else s
        for s in toy.stages()
    )
    with pytest.raises(CfError, match=r"stage cdmd2 finished but did not write .*missing.bin"):
        pipeline.run_pipeline(cfg_for(tmp_path), stages, stream=io.StringIO())


def test_mlflow_parent_run_with_nested_stage_runs_and_their_metrics(tmp_path, store):
    toy = Toy()
    cfg = cfg_for(tmp_path, "tracking.ablation=memory", store=store)
    first = pipeline.run_pipeline(cfg, toy.stages(), variant="slowfast", stream=io.StringIO())
    cfg2 = cfg_for(tmp_path, "tracking.ablation=memory", "memory.policy=sliding", store=store)
    second = pipeline.run_pipeline(cfg2, toy.stages(), variant="sliding", stream=io.StringIO())

    client = MlflowClient(tracking.tracking_uri(cfg))
    exp = client.get_experiment_by_name(store[1])
    runs = client.search_runs([exp.experiment_id])
    parents = {r.info.run_id: r for r in runs if r.data.tags["stage"] == "pipeline"}
    assert set(parents) == {first.parent_run_id, second.parent_run_id}
    p1, p2 = parents[first.parent_run_id], parents[second.parent_run_id]
    for p, variant, memory in ((p1, "slowfast", "slowfast"), (p2, "sliding", "sliding")):
        assert p.info.status == "FINISHED"
        tags = p.data.tags
        assert (tags["variant"], tags["memory"], tags["ablation"], tags["method"]) == (
            variant,
            memory,
            "memory",
            "context_forcing",
        )
        assert tags["git_sha"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.parent_run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(NAMES)
    # stage metrics land in the parent under the stage's name; the toy logs len(calls) at its call
    assert p1.data.metrics["teacher/psnr"] == 1.0 and p1.data.metrics["teacher_erft/psnr"] == 2.0
    assert p1.data.metrics["cdmd1/score"] == 4.0 and p1.data.metrics["cdmd2/score"] == 5.0
    assert p1.data.metrics["bench/score"] == 6.0 and p1.data.metrics["pipeline/teacher_cached"] == 0.0
    # the second pipeline reused the teachers: their metrics are copied from the cache markers
    assert p2.data.metrics["teacher_erft/psnr"] == 2.0 and p2.data.metrics["pipeline/teacher_cached"] == 1.0
    assert p2.data.metrics["student/score"] == 7.0 and p2.data.metrics["pipeline/stages_run"] == 4.0
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == second.parent_run_id]) == 4
    # each pipeline names the stage runs it used: a cached stage's run belongs to the first parent
    first_teacher = next(r.info.run_id for r in children if r.data.tags["stage"] == "teacher")
    assert p1.data.tags["run.teacher"] == first_teacher == p2.data.tags["run.teacher"]
    assert p2.data.tags["run.student"] != p1.data.tags["run.student"]


def test_a_resumed_pipeline_continues_its_parent_run(tmp_path, store):
    cfg = cfg_for(tmp_path, store=store)
    toy = Toy(die_in={"student"})
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, toy.stages(), stream=io.StringIO())
    state = json.loads((pipeline.run_dir(cfg) / "pipeline.json").read_text())
    client = MlflowClient(tracking.tracking_uri(cfg))
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"
    # a stage run that a hard kill (no chance to close it) left RUNNING
    exp = client.get_experiment_by_name(store[1]).experiment_id
    orphan = client.create_run(exp, tags={"mlflow.parentRunId": state["parent_run_id"], "stage": "x"})
    res = pipeline.run_pipeline(cfg, toy.stages(), stream=io.StringIO())
    assert res.parent_run_id == state["parent_run_id"]
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    again = pipeline.run_pipeline(cfg, toy.stages(), stream=io.StringIO())
    assert again.ran == [] and again.parent_run_id != res.parent_run_id  # a new run, all cached


def test_progress_line_counts_stages_and_estimates_time_left(tmp_path):
    planned = pipeline.plan(cfg_for(tmp_path))
    out = io.StringIO()
    prog = pipeline.PipelineProgress(planned, {"teacher": 600.0, "teacher_erft": 60.0}, out, title="p")
    prog.end(planned[0], None)
    prog.start(planned[1], resumed=False)
    line = out.getvalue().strip()
    assert line.startswith("[p #----- 1/6] teacher_erft running in ")
    assert "done: teacher cached" in line
    assert "left > 0:01:00 (not timed yet: student, cdmd1, cdmd2, bench)" in line
    prog2 = pipeline.PipelineProgress(planned[:2], {"teacher": 600.0, "teacher_erft": 60.0}, out, title="p")
    prog2.end(planned[0], 125.0)
    prog2.close()
    assert out.getvalue().splitlines()[-1].startswith("[p #- 1/2] all stages done | done: teacher 0:02:05")
    assert out.getvalue().splitlines()[-1].endswith("left ~0:01:00")


def test_past_durations_are_per_preset_medians_of_uninterrupted_stages(tmp_path):
    for i, (stage, preset, sec, resumed) in enumerate(
        [
            ("teacher", "smoke", 10, False),
            ("teacher", "smoke", 30, False),
            ("teacher", "smoke", 20, False),
            ("teacher", "tiny", 999, False),
            ("student", "smoke", 5, True),
        ]
    ):
        d = tmp_path / f"{stage}-{i}"
        d.mkdir()
        (d / "done.json").write_text(
            json.dumps({"stage": stage, "preset": preset, "seconds": sec, "resumed": resumed})
        )
    assert pipeline.past_durations(tmp_path, "smoke") == {"teacher": 20.0}


# --- the real stages ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_then_another_policy_reuses_the_teacher(tmp_path, store):
    cfg = cfg_for(tmp_path, store=store)
    res = pipeline.run_pipeline(cfg, stream=io.StringIO())
    assert res.ran == NAMES
    dest = pipeline.run_dir(cfg)
    assert (dest / "generator.safetensors").is_file() and any((dest / "bench").iterdir())
    from cf.model import build_model

    build_model(cfg, "cpu", weights=dest / "generator.safetensors")  # the hand-off loads
    for name in NAMES[:-1]:
        assert (res.stages[NAMES.index(name)].dir / name / "last.ckpt").is_file()
    again = pipeline.run_pipeline(
        cfg_for(tmp_path, "memory.policy=sliding", store=store), stream=io.StringIO()
    )
    assert again.ran == ["student", "cdmd1", "cdmd2", "bench"]
    client = MlflowClient(tracking.tracking_uri(cfg))
    parent = client.get_run(res.parent_run_id)
    assert any(k.startswith("bench/") for k in parent.data.metrics)
    assert any(k.startswith("teacher/") for k in parent.data.metrics)


def test_cf_ablate_plan_names_the_run_dir_and_each_stage_state(tmp_path, capsys):
    from cf.cli import main

    out = tmp_path / "runs"  # where cfg_for's configs point
    base = ["ablate", "--plan", "--preset", "smoke", "--memory", "sink", "--out", str(out)]
    assert main([*base, "tracking.enabled=false"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"pipeline -> {out}/smoke/context_forcing-sink-seed0:"
    assert [line.split()[:2] for line in lines[1:]] == [[n, "to"] for n in NAMES]
    planned = pipeline.plan(cfg_for(tmp_path, "memory.policy=sink"))
    planned[0].dir.mkdir(parents=True)
    planned[0].marker.write_text("{}")
    (planned[1].dir / "teacher_erft").mkdir(parents=True)
    (planned[1].dir / "teacher_erft" / "last.ckpt").write_text("")
    assert main([*base, "erft.steps=3", "tracking.enabled=false"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"pipeline -> {out}/smoke/context_forcing-sink-seed0-cfg")
    assert lines[1].split()[:2] == ["teacher", "done"]  # the override leaves the teacher alone
    assert lines[2].split()[:2] == ["teacher_erft", "to"]  # another ERFT config: another dir
    assert main([*base, "tracking.enabled=false"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["teacher_erft", "partial"]
