"""What the consistency benchmark compares and what it measured: `Entry` (a method's config at a memory
policy, and its generator weights or random ones), `plan_entries`, which builds them for ``bench.methods`` x
``bench.policies`` from the generators the pipeline leaves in
``runs/<preset>/<method>-<memory>-seed<seed>/generator.safetensors`` (the stage contract), and
`BenchResult`, the measurements `cf.bench.consistency` hands to `cf.bench.report` (both import it from here).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from cf.bench import tables
from cf.errors import CfError
from cf.registry import UnknownNameError

OWN = "own"  # in bench.policies: each method's own memory policy (experiments/methods/<method>.yaml)


@dataclass
class Entry:
    """One generator to benchmark: a method's config (memory.policy set) and its weights."""

    cfg: DictConfig
    generator: Path | None = None  # generator.safetensors; None: random weights ("untrained")

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def memory(self) -> str:
        return self.cfg.memory.policy

    @property
    def weights(self) -> str:
        return "untrained" if self.generator is None else "trained"

    @property
    def name(self) -> str:
        """File-safe name: ``<method>-<memory>`` (``-untrained`` appended for random weights)."""
        return f"{self.method}-{self.memory}" + ("-untrained" if self.generator is None else "")

    @property
    def label(self) -> str:
        return tables.row_label({"method": self.method, "memory": self.memory, "weights": self.weights})


@dataclass
class BenchResult:
    """What `run_consistency` measured. `runs` follows the column contract of `cf.bench.tables`."""

    runs: pd.DataFrame  # one row per entry
    videos: pd.DataFrame  # one row per (entry, seed)
    first_frame: pd.DataFrame  # long form, per entry x backbone x segment
    revisit: pd.DataFrame  # long form, per entry x lag
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None  # the MLflow run (None when tracking is off)

    def metrics(self, i: int = 0) -> dict[str, float]:
        """Entry i's ``bench/<column>`` metrics (finite numbers only), as logged to MLflow."""
        return bench_metrics(self.runs.iloc[i].to_dict())


def bench_metrics(row: dict) -> dict[str, float]:
    """The numeric score columns of a row as ``bench/<column>`` (NaN / missing left out)."""
    skip = {"seconds", "data.fps", "world_seed", "seed", "context_frames"}
    out = {}
    for k, v in row.items():
        if k in skip or isinstance(v, (str, bool)) or v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out[f"bench/{k}"] = v
    return out


def at_inference(cfg: DictConfig) -> DictConfig:
    """`cfg` as the benchmark generates with it: ``bench.memory`` (memory.* overrides for inference only,
    e.g. infinite_rope reads Self-Forcing's generator through a global sink) applied to ``memory`` and then
    cleared. Unchanged (the same object) when there are none."""
    overrides = dict(cfg.bench.memory)
    if not overrides:
        return cfg
    unknown = sorted(set(overrides) - set(cfg.memory))
    if unknown:
        raise CfError(
            f"bench.memory sets {unknown}, which are not memory.* keys; valid: {sorted(cfg.memory)} "
            f"(bench.memory holds memory.* overrides for the benchmark's generation only)"
        )
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        out.memory[key] = value
    out.bench.memory = {}
    return out


def generator_path(runs_dir: str | Path, method: str, memory: str, seed: int) -> Path:
    """Where the pipeline leaves a method's final generator (the stage contract)."""
    return Path(runs_dir) / f"{method}-{memory}-seed{seed}" / "generator.safetensors"


def plan_entries(
    preset: str, methods, policies, overrides=(), runs_dir: str | Path | None = None, untrained: bool = False
) -> list[Entry]:
    """Entries for methods x policies: each method's config (preset <- method <- overrides <- the
    policy; the policy `OWN` is the method's own, e.g. sliding for self_forcing) and its generator from
    `runs_dir` (default ``runs/<preset>``), or random weights if `untrained`. Every missing generator
    is named in one error, with the command that makes it."""
    from cf.config import load_config

    methods, policies = list(dict.fromkeys(methods)), list(dict.fromkeys(policies))
    if not methods or not policies:
        raise CfError(
            f"nothing to benchmark: bench.methods={methods} x bench.policies={policies}; "
            f"name at least one of each, e.g. bench.methods=[context_forcing] bench.policies=[slowfast]"
        )
    from cf.memory import POLICIES

    for policy in policies:
        if policy != OWN and policy not in POLICIES:
            raise UnknownNameError(
                "memory policy",
                policy,
                [*POLICIES.names(), OWN],
                hint=f"'{OWN}' is each method's own policy; set bench.policies=[...]",
            )
    runs_dir = Path(runs_dir) if runs_dir is not None else Path("runs") / preset
    entries, missing = [], []
    seen = set()
    for method in methods:
        for policy in policies:
            own = load_config(preset, method, list(overrides))
            if policy == OWN:  # the method's own: trained with memory.policy, read through bench.memory
                policy = at_inference(own).memory.policy
                cfg = own
            else:
                cfg = load_config(preset, method, [*overrides, f"memory.policy={policy}", "bench.memory={}"])
            if (method, policy) in seen:
                continue
            seen.add((method, policy))
            path = None if untrained else generator_path(runs_dir, method, cfg.memory.policy, cfg.seed)
            cfg = at_inference(cfg)
            if path is not None and not path.is_file():
                missing.append(
                    f"  {path}: make ablate MEMORY={policy} METHOD={method} PRESET={preset} SEED={cfg.seed}"
                )
            entries.append(Entry(cfg, path))
    if missing:
        raise CfError(
            "no trained generator for "
            + ("these entries" if len(missing) > 1 else "this entry")
            + ":\n"
            + "\n".join(missing)
            + f"\ntrain them with the make command shown, point --runs "
            f"at the folder that holds <method>-<memory>-seed<seed>/ (now {str(runs_dir)!r}), "
            f"or pass --untrained to benchmark random weights"
        )
    return entries


def as_entry(cfg, entry) -> Entry:
    """An `Entry`, or a mapping ``{"method", "policy", "generator"}`` read against `cfg`: `cfg` itself
    when it is that method at that policy, else that method's config with `cfg`'s preset and seed."""
    if isinstance(entry, Entry):
        return entry
    if not isinstance(entry, Mapping) or not {"method", "policy", "generator"} <= set(entry):
        raise CfError(
            f"benchmark entry {entry!r} is neither a cf.bench.Entry nor a mapping with keys "
            f"'method', 'policy' and 'generator' (a path, or None for random weights)"
        )
    gen = None if entry["generator"] is None else Path(entry["generator"])
    if (entry["method"], entry["policy"]) == (cfg.method, cfg.memory.policy):
        return Entry(cfg, gen)
    from cf.config import load_config

    return Entry(
        load_config(cfg.preset, entry["method"], [f"memory.policy={entry['policy']}", f"seed={cfg.seed}"]),
        gen,
    )
