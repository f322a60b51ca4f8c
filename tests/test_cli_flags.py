"""No flag is silently ignored: every option of every `cf` subcommand is walked (argparse introspected), and a
flag that belongs to one `--model` is refused, in one line naming it and its model, when given with another.
"""

from __future__ import annotations

import argparse

import pytest

from cf.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(argv prefix, parser) of every leaf subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _subcommands(sub, (*path, name))


SUBCOMMANDS = list(_subcommands(build_parser()))
COMMON = {"--preset", "--method", "--memory", "--seed", "--out", "-h", "--help"}


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings if s.startswith("--")}


def _value(action: argparse.Action, tmp_path) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    if action.type in (int, float):
        return ["4"]
    f = tmp_path / "given.png"
    f.touch()
    return [str(f)]


def test_every_subcommand_is_walked():
    names = {" ".join(path) for path, _ in SUBCOMMANDS}
    assert {"generate", "bench consistency", "bench rollout", "score", "ablate", "world"} <= names


@pytest.mark.parametrize("path, parser", SUBCOMMANDS, ids=[" ".join(p) for p, _ in SUBCOMMANDS])
def test_every_model_only_flag_is_refused_with_the_other_model(path, parser, tmp_path, capsys):
    mod = parser.get_default("_module")
    only_for = getattr(mod, "ONLY_FOR", {})
    options = _options(parser)
    if not only_for:  # a command without model-specific flags has no model switch to ignore them under
        assert "--model" not in options, f"cf {' '.join(path)} has --model but no ONLY_FOR table"
        return
    model_flag = options[mod.MODEL_FLAG]
    models = list(model_flag.choices)
    # every option is classified: it belongs to one model (ONLY_FOR) or to every model (FOR_EVERY_MODEL)
    unclassified = set(options) - set(only_for) - set(mod.FOR_EVERY_MODEL) - COMMON - {mod.MODEL_FLAG}
    assert not unclassified, f"cf {' '.join(path)}: say which --model these flags belong to: {unclassified}"
    assert set(only_for.values()) <= set(models)
    for flag, owner in only_for.items():
        action = options[flag]
        assert action.default is None, f"{flag} must default to None so that giving it can be told"
        for other in (m for m in models if m != owner):
            out = tmp_path / f"out-{flag.strip('-')}-{other}"
            rc = main([*path, mod.MODEL_FLAG, other, flag, *_value(action, tmp_path), "--out", str(out)])
            err = capsys.readouterr().err.strip()
            assert rc == 2 and not out.exists(), (flag, other, err)
            assert err.count("\n") == 0 and flag in err and f"{mod.MODEL_FLAG} {owner}" in err, err


def test_the_reported_case_a_lora_on_a_native_model(tmp_path, capsys):
    rc = main(["generate", "--preset", "smoke", "--lora", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()
    assert capsys.readouterr().err.strip() == (
        "cf: error: --lora belongs to --model wan, but this run is --model native; drop --lora or pass "
        "--model wan")
