"""Ablation grids: the shipped files, parsing and its errors, precedence, and a grid on toy stages."""

import dataclasses
import io
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cf import ablation, pipeline
from cf.cli import main
from cf.errors import CfError

SHIPPED = ablation.available()


def grid(tmp_path, text, name="grid"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def configs(path, preset="tiny", method=None, overrides=(), out="runs"):
    return ablation.variant_configs(ablation.load_ablation(path), preset, method, overrides, out=out)


def test_the_shipped_grids_cover_the_issue_axes():
    assert SHIPPED == [
        "bounded_positions",
        "claims",
        "claims_world",
        "erft",
        "memory",
        "methods",
        "promotion",
        "stage2",
        "tau",
        "teacher_context",
        "teacher_curve",
        "teacher_curve_world",
    ]


@pytest.mark.parametrize("name", ["claims", "claims_world"])
def test_the_claims_grids_give_every_recipe_the_same_steps(name):
    """Budgets in optimizer steps, equal across the recipes a claim compares (the 16-frame and 4-frame
    teachers alike): a wall clock never decides how much a recipe trains."""
    budgets = {variant: tuple(OmegaConf.select(cfg, k) for k in (
        "trainer.max_steps", "erft.steps", "student.steps", "cdmd.stage1_steps", "cdmd.stage2_steps"))
        for variant, cfg in ablation.variant_configs(ablation.load_ablation(name), "tiny").items()}
    assert len(set(budgets.values())) == 1, budgets
    teachers = {cfg.teacher.context_frames for cfg in
                ablation.variant_configs(ablation.load_ablation(name), "tiny").values()}
    assert teachers == {4, 16}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_grid_builds_distinct_validated_variants_at_tiny(name):
    ab = ablation.load_ablation(name)
    assert ab.name == name and ab.description and len(ab.variants) >= 2
    cfgs = ablation.variant_configs(ab, "tiny")
    assert list(cfgs) == list(ab.variants)
    for variant, cfg in cfgs.items():
        assert cfg.tracking.ablation == name
        for key, value in ab.variants[variant].items():
            assert (cfg.method if key == "method" else OmegaConf.select(cfg, key)) == value, (variant, key)


def test_memory_grid_trains_one_teacher_and_four_students():
    cfgs = configs("memory")
    plans = {v: {p.name: p.key for p in pipeline.plan(c)} for v, c in cfgs.items()}
    assert list(plans) == ["full", "sliding", "sink", "slowfast"]
    assert len({p["teacher_erft"] for p in plans.values()}) == 1
    assert len({p["student"] for p in plans.values()}) == 4
    assert {c.memory.policy for c in cfgs.values()} == set(plans)
    assert {c.tracking.run_name for c in cfgs.values()} == {None}  # the policy already names the run
    erft = configs("erft")
    assert [c.tracking.run_name for c in erft.values()] == [
        "context_forcing-slowfast-tiny-erft=on",
        "context_forcing-slowfast-tiny-erft=off",
    ]


def test_methods_grid_keeps_each_methods_policy_unless_the_command_line_sets_one():
    own = configs("methods")
    assert {v: (c.method, c.memory.policy) for v, c in own.items()} == {
        "self_forcing": ("self_forcing", "sliding"),
        "longlive": ("longlive", "sink"),
        "context_forcing": ("context_forcing", "slowfast"),
    }
    fixed = configs("methods", overrides=["memory.policy=full"])
    assert {c.memory.policy for c in fixed.values()} == {"full"}


def test_precedence_file_overrides_then_command_line_then_variant(tmp_path):
    path = grid(
        tmp_path,
        "overrides: {student.steps: 7, cdmd.critic_ratio: 3}\n"
        "variants:\n  a: {cdmd.critic_ratio: 1}\n  b: {cdmd.critic_ratio: 2, method: self_forcing}\n",
    )
    cfgs = configs(path, "smoke", overrides=["student.steps=9", "cdmd.critic_ratio=4"])
    assert [cfgs[v].cdmd.critic_ratio for v in "ab"] == [1, 2]  # the variant sets its axis
    assert cfgs["a"].student.steps == 9  # the command line beats the file's overrides
    assert (cfgs["a"].method, cfgs["b"].method) == ("context_forcing", "self_forcing")
    assert cfgs["a"].tracking.ablation == "grid"


def test_axis_form_names_variants_after_values_and_booleans_on_off(tmp_path):
    ab = ablation.load_ablation(grid(tmp_path, "axis: erft.enabled\nvalues: [true, false]\n"))
    assert ab.variants == {"on": {"erft.enabled": True}, "off": {"erft.enabled": False}}
    assert ab.name == "grid" and ab.method is None and ab.overrides == {}


@pytest.mark.parametrize(
    "text, match",
    [
        ("variant:\n  a: {}\n", r"unknown key 'variant' \(did you mean 'variants'\?\); valid keys: name,"),
        ("axis: memory.policy\nvalues: [full]\nvariants: {a: {}}\n", "either `variants:`"),
        ("description: nothing\n", "either `variants:`"),
        ("variants: {}\n", "`variants:` must map variant names"),
        ("variants: [a, b]\n", "`variants:` must map variant names"),
        ("axis: memory.policy\nvalues: full\n", "`values:` a non-empty list"),
        ("axis: memory.policy\nvalues: [full, full]\n", r"`values:` repeats a value"),
        (
            "variants:\n  a: {memory: {policy: full}}\n",
            r"memory is a mapping; write its leaves as dotted keys",
        ),
        ("variants:\n  a: full\n", r"variant 'a' must be a mapping of config keys"),
        ("variants:\n  a b: {seed: 1}\n", r"name 'a b' may use only letters"),
        ("- a\n- b\n", "must be a mapping with `variants:`"),
        ("variants: {a: [\n", "not valid YAML"),
    ],
)
def test_malformed_grid_files_fail_with_the_file_and_the_fix(tmp_path, text, match):
    path = grid(tmp_path, text)
    with pytest.raises(CfError, match=match) as e:
        ablation.load_ablation(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "variants, match",
    [
        (
            "a: {memory.polcy: full}\n  b: {}",
            r"variant 'a': unknown config key 'memory.polcy'.*did you mean 'memory.policy'",
        ),
        ("a: {memory.policy: slowfsat}\n  b: {}", r"variant 'a': unknown memory policy 'slowfsat'.*slowfast"),
        ("a: {method: selfforcing}\n  b: {}", r"variant 'a': unknown method 'selfforcing'"),
        (
            "a: {cdmd.critic_ratio: many}\n  b: {}",
            r"variant 'a': bad value for config key 'cdmd.critic_ratio'",
        ),
        ("a: {trainer.log_every: 3}\n  b: {}", r"variants 'a' and 'b' give the same pipeline"),
    ],
)
def test_bad_variants_are_refused_before_anything_runs(tmp_path, variants, match):
    path = grid(tmp_path, f"variants:\n  {variants}\n")
    with pytest.raises(CfError, match=match):
        configs(path, "smoke")


def test_a_missing_grid_lists_the_available_ones():
    with pytest.raises(
        CfError, match=r"ablation 'memroy' is neither a file nor a name in ablations/; available: .*memory"
    ):
        ablation.load_ablation("memroy")


def test_a_grid_on_toy_stages_publishes_canonical_variants_in_place_and_others_beside(tmp_path):
    calls: list[tuple[str, str]] = []

    def toy(name):
        def run(cfg, out_dir, inputs, parent_run_id):
            calls.append((name, cfg.tracking.ablation))
            d = Path(out_dir) / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "last.ckpt").write_text(name)
            (d / "generator.safetensors").write_text(f"{name} erft={cfg.erft.enabled}")
            return d if name == "bench" else d / "last.ckpt"

        return run

    stages = tuple(dataclasses.replace(s, run=toy(s.name)) for s in pipeline.STAGES)
    ab = ablation.load_ablation("erft")
    cfgs = ablation.variant_configs(ab, "smoke", overrides=["tracking.enabled=false"], out=str(tmp_path))
    res = ablation.run_ablation(ab, cfgs, stages, stream=io.StringIO())
    assert res["on"].run_dir == tmp_path / "smoke" / "context_forcing-slowfast-seed0"
    assert res["off"].run_dir == tmp_path / "smoke" / "context_forcing-slowfast-seed0-erft-off"
    assert (res["off"].run_dir / "generator.safetensors").read_text() == "cdmd2 erft=False"
    # ERFT off: the plain teacher is reused, nothing of the ERFT chain is
    assert res["off"].ran == ["student", "cdmd1", "cdmd2", "bench"]
    assert {a for _, a in calls} == {"erft"}
    state = json.loads((res["off"].run_dir / "pipeline.json").read_text())
    assert state["variant"] == "off" and "teacher_erft" not in state["stages"]


def test_cf_ablate_plan_prints_each_variants_stages_and_runs_nothing(tmp_path, capsys):
    argv = ["ablate", "--ablation", "memory", "--plan", "--preset", "smoke", "--out", str(tmp_path)]
    assert main([*argv, "tracking.enabled=false"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [line for line in lines if not line.startswith("  ")]
    assert heads == [
        f"memory / {p} -> {tmp_path}/smoke/context_forcing-{p}-seed0:"
        for p in ("full", "sliding", "sink", "slowfast")
    ]
    stages = [line.split() for line in lines if line.startswith("  ")]
    assert [s[0] for s in stages] == [*pipeline_names()] * 4
    assert {s[1] for s in stages} == {"to"}  # "to do": nothing has run
    assert len({s[-1] for s in stages if s[0] == "teacher"}) == 1  # one teacher for all four
    assert len({s[-1] for s in stages if s[0] == "student"}) == 4
    assert not (tmp_path / "cache").exists()


def pipeline_names():
    return ["teacher", "teacher_erft", "student", "cdmd1", "cdmd2", "bench"]


def test_the_world_claims_grid_is_the_claims_grid_with_world_positions():
    frame, world = ablation.load_ablation("claims"), ablation.load_ablation("claims_world")
    assert frame.overrides["model.positions"] == "frame" and world.overrides["model.positions"] == "world"
    assert {**world.overrides, "model.positions": "frame"} == dict(frame.overrides)
    assert world.variants == frame.variants
    assert world.name != frame.name  # its own run names and tables: the schemes never share a row


def test_select_variants_keeps_the_order_given_and_refuses_unknown_names():
    ab = ablation.load_ablation("claims")
    picked = ablation.select_variants(ab, ["self_forcing", "context_forcing"])
    assert list(picked.variants) == ["self_forcing", "context_forcing"]
    assert picked.overrides == ab.overrides
    with pytest.raises(CfError, match="self_forcin'"):
        ablation.select_variants(ab, ["self_forcin"])


def test_tau_and_teacher_context_are_cells_of_the_world_claims_grid():
    """The two older ablations run at the claims_world budgets, so their shared cells are the same stages
    (same cache hashes, bench included): re-measuring them costs only what the grid does not already run."""
    def plans(name):
        return {v: {p.name: p.key for p in pipeline.plan(c)} for v, c in configs(name).items()}

    world, context, tau = plans("claims_world"), plans("teacher_context"), plans("tau")
    assert context == {"long": world["context_forcing"], "window": world["cf_window"],
                       "short": world["cf_short"]}
    assert tau["tau0.998"] == world["context_forcing"]
    assert {p["teacher_erft"] for p in tau.values()} == {world["context_forcing"]["teacher_erft"]}
    assert len({p["cdmd2"] for p in tau.values()}) == 4
