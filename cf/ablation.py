"""Ablation grids: one axis per YAML file in `ablations/`, each variant a full pipeline run.

Two forms, a few lines each:

    # one key swept over values (the variant is named after the value)
    axis: memory.policy
    values: [full, sliding, sink, slowfast]

    # named variants that may set several keys; `method` picks experiments/methods/<name>.yaml
    variants:
      similarity: {memory.promotion: similarity}
      uniform1:   {memory.promotion: uniform, memory.promote_every: 1}

Optional keys: `name` (the MLflow `ablation` tag and `results/<name>.md`; default: the file's
stem), `description` (one line for the tables), `method` (the base method when the command
line names none), `overrides` (a mapping applied to every variant). Order of precedence:
preset <- method <- the file's overrides <- the command line <- the variant, so the variant
always sets its axis. Every variant's config is built and validated, and two variants that
would train the same pipeline are refused, before anything runs.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from cf.config.load import ROOT, ConfigError, load_config
from cf.errors import CfError
from cf.registry import UnknownNameError

ABLATIONS = ROOT / "ablations"
KEYS = ("name", "description", "method", "overrides", "axis", "values", "variants")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Ablation:
    name: str
    path: Path
    description: str
    method: str | None
    overrides: dict[str, Any]
    variants: dict[str, dict[str, Any]]  # variant -> {dotted key or "method": value}


def available() -> list[str]:
    return sorted(p.stem for p in ABLATIONS.glob("*.yaml"))


def resolve_path(spec: str | Path) -> Path:
    """A path to a YAML file, or the name of one in ablations/ (`memory` -> ablations/memory.yaml)."""
    path = Path(spec)
    if path.is_file():
        return path
    named = ABLATIONS / f"{spec}.yaml"
    if named.is_file():
        return named
    raise CfError(
        f"ablation {str(spec)!r} is neither a file nor a name in ablations/; "
        f"available: {', '.join(available()) or 'none'}"
    )


def _fail(path: Path, msg: str) -> CfError:
    return CfError(f"{path}: {msg}")


def _mapping(path: Path, where: str, node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise _fail(
            path,
            f"{where} must be a mapping of config keys to values (e.g. {{erft.enabled: false}}), "
            f"got {type(node).__name__} {node!r}",
        )
    for k, v in node.items():
        if not isinstance(k, str):
            raise _fail(path, f"{where}: key {k!r} must be a dotted config key such as memory.policy")
        if isinstance(v, dict):
            raise _fail(
                path, f"{where}: {k} is a mapping; write its leaves as dotted keys ({k}.<key>: value)"
            )
    return dict(node)


def _variant_name(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def load_ablation(spec: str | Path) -> Ablation:
    """Parse and check the file's shape (config keys are checked by `variant_configs`)."""
    path = resolve_path(spec)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _fail(path, f"not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise _fail(path, "must be a mapping with `variants:` (or `axis:` + `values:`)")
    for key in doc:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(path, f"unknown key {key!r}{hint}; valid keys: {', '.join(KEYS)}")
    has_axis = "axis" in doc or "values" in doc
    if has_axis == ("variants" in doc):
        raise _fail(
            path, "give either `variants:` (named variants) or `axis:` with `values:`, not both or neither"
        )
    if has_axis:
        axis, values = doc.get("axis"), doc.get("values")
        if not isinstance(axis, str) or not isinstance(values, list) or not values:
            raise _fail(
                path, "`axis:` must be one config key (e.g. memory.policy) and `values:` a non-empty list"
            )
        variants = {_variant_name(v): {axis: v} for v in values}
        if len(variants) != len(values):
            raise _fail(path, f"`values:` repeats a value: {values}")
    else:
        if not isinstance(doc["variants"], dict) or not doc["variants"]:
            raise _fail(
                path, "`variants:` must map variant names to their settings, e.g. off: {erft.enabled: false}"
            )
        variants = {str(n): _mapping(path, f"variant {n!r}", v) for n, v in doc["variants"].items()}
    name = str(doc.get("name") or path.stem)
    for n in (name, *variants):
        if not NAME.match(n):
            raise _fail(path, f"name {n!r} may use only letters, digits, '_', '.' and '-' (it names folders)")
    method = doc.get("method")
    if method is not None and not isinstance(method, str):
        raise _fail(path, f"`method:` must be a method name, got {method!r}")
    return Ablation(
        name,
        path,
        str(doc.get("description") or ""),
        method,
        _mapping(path, "`overrides:`", doc.get("overrides")),
        variants,
    )


def select_variants(ab: Ablation, names: list[str]) -> Ablation:
    """`ab` with only the named variants, in the order given (unknown names are refused)."""
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in ab.variants]
    if unknown or not names:
        raise CfError(
            f"{ab.path}: no variant {unknown or names!r}; this grid has {', '.join(ab.variants)} "
            f"(--variants takes a comma-separated subset)"
        )
    return replace(ab, variants={n: ab.variants[n] for n in names})


def _dotlist(settings: dict[str, Any]) -> list[str]:
    """{key: value} -> ["key=value"], values in the YAML flow form OmegaConf parses back."""
    out = []
    for k, v in settings.items():
        text = v if isinstance(v, str) else "null" if v is None else json.dumps(v)
        out.append(f"{k}={text}")
    return out


def variant_configs(
    ab: Ablation,
    preset: str,
    method: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | None = None,
) -> dict[str, DictConfig]:
    """Every variant's validated config, tagged `tracking.ablation=<name>`; errors name the variant."""
    from cf.pipeline import plan

    configs: dict[str, DictConfig] = {}
    seen: dict[str, str] = {}
    for variant, settings in ab.variants.items():
        settings = dict(settings)
        v_method = settings.pop("method", None) or method or ab.method
        try:
            cfg = load_config(
                preset,
                v_method,
                [*_dotlist(ab.overrides), *overrides, *_dotlist(settings), f"tracking.ablation={ab.name}"],
                out=out,
            )
        except (ConfigError, UnknownNameError) as e:
            raise _fail(ab.path, f"variant {variant!r}: {e}") from None
        key = plan(cfg)[-1].key
        if key in seen:
            raise _fail(
                ab.path,
                f"variants {seen[key]!r} and {variant!r} give the same pipeline (every stage "
                "hashes the same); make them differ in a key a stage reads",
            )
        seen[key] = variant
        if cfg.tracking.run_name is None and variant not in (cfg.method, cfg.memory.policy):
            # the MLflow run names tell variants apart that share a method and a policy
            cfg.tracking.run_name = f"{cfg.method}-{cfg.memory.policy}-{preset}-{ab.name}={variant}"
        configs[variant] = cfg
    return configs


def run_ablation(ab: Ablation, configs: dict[str, DictConfig], stages=None, stream=None) -> dict[str, Any]:
    """Run each variant's pipeline in turn (shared stages are trained once and reused)."""
    import sys

    from cf.pipeline import STAGES, canonical_label, run_pipeline

    stages = STAGES if stages is None else stages
    stream = sys.stderr if stream is None else stream
    results = {}
    for i, (variant, cfg) in enumerate(configs.items()):
        print(f"[ablation {ab.name}: variant {i + 1}/{len(configs)} {variant!r}]", file=stream, flush=True)
        # the method's own config publishes to its usual dir; other variants get a named one
        label = None if canonical_label(cfg, stages) is None else f"{ab.name}-{variant}"
        results[variant] = run_pipeline(cfg, stages, label=label, variant=variant, stream=stream)
    return results
