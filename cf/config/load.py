"""Load, merge and validate configs: defaults <- preset <- method <- `key=value` overrides."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from cf.config.schema import Config
from cf.errors import CfError

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"

# Plain enumerations: the valid values of a string key.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.texture": ("procedural", "photo", "mixed"),
    "model.prediction": ("x0", "velocity"),
    "model.precondition": ("none", "edm"),
    "model.positions": ("world", "frame"),
    "model.text_encoder": ("learned", "minilm", "none"),
    "model.dtype": ("auto", "fp32", "bf16", "fp16", "fp64"),
    "model.attention_backend": ("auto", "math", "flash", "efficient", "cudnn"),
    "memory.promotion": ("similarity", "uniform"),
    "trainer.schedule": ("cosine", "constant"),
    "trainer.strategy": ("auto", "ddp", "fsdp"),
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true"),
    "cdmd.teacher_history": ("policy", "window"),
}

# Named choices that resolve through a registry (module:attribute), checked at load time.
REGISTRY_KEYS: dict[str, str] = {
    "memory.policy": "cf.memory:POLICIES",
    "data.source": "cf.data:DATA_SOURCES",
    "data.camera_path": "cf.data.world:CAMERA_PATHS",
    "bench.backbone": "cf.metrics.backbones:BACKBONES",
}


# Numeric domains (checked for every preset, method, grid and override at load time). Every number must
# be finite and >= 0 except the keys in MAY_BE_NEGATIVE; these must also be > 0:
POSITIVE = (
    "trainer.lr", "student.lr", "cdmd.critic_lr", "cdmd.generator_lr",
    "trainer.max_steps", "trainer.num_nodes", "student.steps", "erft.steps", "cdmd.stage1_steps",
    "cdmd.stage2_steps", "trainer.max_minutes", "student.max_minutes", "cdmd.stage1_max_minutes",
    "cdmd.stage2_max_minutes", "model.channels", "model.ffn_dim", "model.text_tokens", "model.vocab_size",
    "model.text_dim", "model.rope_theta", "model.video_frames_per_latent", "data.eval_clips",
    "data.pano_frames", "diffusion.num_timesteps", "diffusion.teacher_steps",
    "teacher.target_chunks", "erft.bins", "erft.bank_size", "erft.collect_every", "student.ode_pairs",
    "student.rollout_chunks", "student.eval_videos", "student.eval_seconds", "cdmd.short_chunks",
    "cdmd.long_chunks_start", "cdmd.long_chunks_end", "cdmd.dmd_shift", "bench.seconds", "bench.segment_s",
    "bench.context_factor", "model.dim", "model.depth", "model.heads", "model.patch_size",
    "model.frames_per_chunk", "model.position_scale", "data.height", "data.width", "data.fps",
    "data.clip_frames", "data.batch_size",
)
# ... and these lie in [0, 1) (EMA decays, Adam betas) or [0, 1] (probabilities):
BELOW_ONE = ("trainer.ema", "student.ema", "cdmd.ema", "trainer.betas", "cdmd.betas")
PROBABILITY = ("teacher.cond_drop", "erft.p_history", "erft.p_target", "erft.p_noise", "erft.p_clean")
MAY_BE_NEGATIVE = ("seed", "data.seed", "data.eval_seed", "bench.seeds", "trainer.devices", "memory.tau")


class ConfigError(CfError, ValueError):
    """A config that cannot be used; the message names the key, the value and the fix."""


def available(kind: str) -> list[str]:
    """Names of the YAML files in experiments/<kind>/ (kind: presets | methods)."""
    return sorted(p.stem for p in (EXPERIMENTS / kind).glob("*.yaml"))


def _yaml(kind: str, name: str) -> DictConfig:
    path = EXPERIMENTS / kind / f"{name}.yaml"
    if not path.is_file():
        from cf.registry import UnknownNameError

        singular = kind.rstrip("s")
        raise UnknownNameError(singular, name, available(kind), hint=f"add {EXPERIMENTS / kind}/{name}.yaml")
    node = OmegaConf.load(path)
    return node if node is not None else OmegaConf.create({})


def _valid_keys_near(cfg: DictConfig, full_key: str) -> str:
    parts = full_key.split(".")
    parent: Any = cfg
    for p in parts[:-1]:
        if isinstance(parent, DictConfig) and p in parent:
            parent = parent[p]
        else:
            break
    prefix = ".".join(parts[: len(parts) - 1])
    keys = list(parent.keys()) if isinstance(parent, DictConfig) else []
    close = difflib.get_close_matches(parts[-1], keys, n=3, cutoff=0.5)
    where = f" in '{prefix}'" if prefix else ""
    msg = f"valid keys{where}: {', '.join(str(k) for k in keys)}"
    if close:
        msg = f"did you mean {' or '.join(repr(f'{prefix}.{c}' if prefix else c) for c in close)}? " + msg
    return msg


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = e.full_key or str(e.key)
        near = _valid_keys_near(base, key)
        raise ConfigError(f"unknown config key '{key}' (from {source}); {near}") from None
    except ValidationError as e:
        key = e.full_key
        raise ConfigError(
            f"bad value for config key '{key}' (from {source}): {e.msg.splitlines()[0]}; "
            f"expected {_type_name(base, key)}"
        ) from None


def _type_name(cfg: DictConfig, key: str) -> str:
    """The declared type of `key`, read from the dataclass schema."""
    import dataclasses
    import typing

    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return "a value of the key's declared type"
        t = hints[part]
        if i == len(parts) - 1:
            return str(t).replace("typing.", "").replace("<class '", "").replace("'>", "")
        if not dataclasses.is_dataclass(t):
            return "a value of the key's declared type"
        cls = t
    return "a value of the key's declared type"


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. memory.policy=sliding)")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(
    preset: str = "tiny",
    method: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | None = None,
) -> DictConfig:
    """Build the validated config. `method=None` keeps the default method of the preset."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.bench.memory, False)  # open: memory.* keys, checked by cf.bench.at_inference
    cfg = _merge(cfg, _yaml("presets", preset), f"experiments/presets/{preset}.yaml")
    cfg.preset = preset
    method = method or cfg.method
    cfg = _merge(cfg, _yaml("methods", method), f"experiments/methods/{method}.yaml")
    cfg.method = method
    cfg = _merge(cfg, parse_overrides(list(overrides)), "the command line")
    if out is not None:
        cfg.out = out
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _registry(spec: str):
    mod_name, attr = spec.split(":")
    try:
        if importlib.util.find_spec(mod_name) is None:
            return None
    except ModuleNotFoundError:  # a parent package that does not exist (yet)
        return None
    return getattr(importlib.import_module(mod_name), attr)


def _numbers(node: Any, prefix: str = ""):
    """(key, value) for every number in a plain container (list items as `key[i]`)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix, node


def _default(key: str) -> str:
    value = OmegaConf.select(OmegaConf.structured(Config), key)
    return f" (the default is {value})" if value is not None else ""


def check_domains(cfg: DictConfig) -> None:
    """Numbers in their domains: finite, >= 0 unless MAY_BE_NEGATIVE, > 0 for POSITIVE, [0, 1) for
    BELOW_ONE, [0, 1] for PROBABILITY. A NaN or negative rate fails here, not in the optimizer."""
    for item, v in _numbers(OmegaConf.to_container(cfg, resolve=True)):
        key = item.split("[")[0]
        if not math.isfinite(v):
            raise ConfigError(f"{item}={v} is not a finite number; set {key} to a number{_default(key)}")
        if key in POSITIVE and v <= 0:
            raise ConfigError(f"{item}={v} must be positive; set {key} to a number > 0{_default(key)}")
        if key in BELOW_ONE and not 0 <= v < 1:
            raise ConfigError(f"{item}={v} must be in [0, 1) (a decay or an Adam beta){_default(key)}")
        if key in PROBABILITY and not 0 <= v <= 1:
            raise ConfigError(f"{item}={v} must be a probability in [0, 1]{_default(key)}")
        if v < 0 and key not in MAY_BE_NEGATIVE:
            raise ConfigError(f"{item}={v} must be >= 0; set {key} to a non-negative number{_default(key)}")


def validate(cfg: DictConfig) -> None:
    """Check choices and ranges that the type system cannot express."""
    check_domains(cfg)
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(valid)}; set {key}=<one of them>")
    m, d, mem = cfg.model, cfg.data, cfg.memory
    if m.precondition == "edm" and m.prediction != "x0":
        raise ConfigError(f"model.precondition=edm preconditions an x0 output, but model.prediction="
                          f"{m.prediction!r}; set model.prediction=x0 or model.precondition=none")
    if m.sigma_data <= 0:
        raise ConfigError(f"model.sigma_data={m.sigma_data} must be positive (the data's RMS, ~0.5)")
    if m.dim % m.heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.heads={m.heads}; "
                          "pick dim = k * heads")
    if (m.dim // m.heads) % 2:
        raise ConfigError(f"head width model.dim/model.heads={m.dim // m.heads} must be even "
                          "for rotary positions")
    for side in ("height", "width"):
        if d[side] % m.patch_size:
            raise ConfigError(
                f"data.{side}={d[side]} is not divisible by model.patch_size={m.patch_size}; "
                f"use a multiple of {m.patch_size} or another patch size"
            )
    for key in ("sink_frames", "window_frames", "slow_frames", "promote_after"):
        if mem[key] < 0:
            raise ConfigError(f"memory.{key}={mem[key]} must be >= 0")
    if mem.window_frames < m.frames_per_chunk:
        raise ConfigError(
            f"memory.window_frames={mem.window_frames} is smaller than model.frames_per_chunk="
            f"{m.frames_per_chunk}: the window counts the frames a chunk attends to including itself; "
            f"set memory.window_frames >= {m.frames_per_chunk}"
        )
    if mem.promote_every < 1:
        raise ConfigError(f"memory.promote_every={mem.promote_every} must be >= 1 (chunks between checks)")
    for key in ("train_shift", "sample_shift", "student_shift"):
        if cfg.diffusion[key] <= 0:
            raise ConfigError(f"diffusion.{key}={cfg.diffusion[key]} must be positive (1 = no shift)")
    for p in ("p_history", "p_target", "p_noise", "p_clean"):
        if not 0.0 <= cfg.erft[p] <= 1.0:
            raise ConfigError(f"erft.{p}={cfg.erft[p]} must be a probability in [0, 1]")
    for key, spec in REGISTRY_KEYS.items():
        reg = _registry(spec)
        if reg is not None:
            reg.get(OmegaConf.select(cfg, key))  # raises UnknownNameError listing the valid names


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig | dict, keys: list[str] | None = None) -> str:
    """A short stable hash of (a subset of) a config: the identity of what it determines."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    if keys is not None:
        container = {k: OmegaConf.select(OmegaConf.create(container), k) for k in sorted(keys)}
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
