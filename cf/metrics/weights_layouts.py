"""Where a feature backbone's weights are, in any of the layouts people download them in.

A `Source` is one set of weights on disk: the file to read, and the config files of the snapshot
folder it sits in (``config.json`` of timm / transformers, ``open_clip_config.json``). `locate` turns
`bench.weights` (a file, a snapshot folder, or a folder holding several things) into the one `Source`
for a backbone family, or fails listing what it found:

- a file is taken as it is (a ``config.json`` path stands for its folder);
- a snapshot folder (one with a config file) is taken when its config describes this family;
- any other folder is searched recursively: snapshot folders whose config describes the family, and
  loose weight files whose name is one the family's releases use (``dino_*``, ``dinov2_*``, OpenAI's
  ``ViT-B-32.pt``, ``*clip*``); more than one candidate is an error that lists them;
- torch's hub cache (``$TORCH_HOME/hub/checkpoints``) is searched the same way, last.

The architecture is never read from these names: the backbone modules read it from configs and shapes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cf.errors import CfError
from cf.metrics.weights import HF_WEIGHT_FILES, WEIGHT_SUFFIXES, MissingWeightsError, hub_checkpoints_dir

CONFIG_FILES = ("open_clip_config.json", "config.json")
TRANSFORMERS_TYPES = {"clip": "clip", "clip_vision_model": "clip", "vit": "dino", "dinov2": "dinov2"}
# in a snapshot, which weight file to read: the same weights saved twice are not a choice to make
SNAPSHOT_FILES = {
    "clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
             "pytorch_model.bin"),
    "dino": ("model.safetensors", "pytorch_model.bin"),
    "dinov2": ("model.safetensors", "pytorch_model.bin"),
}


@dataclass(frozen=True)
class Family:
    name: str  # the backbone name: dino | dinov2 | clip
    what: str  # for messages
    loose_names: str  # regex on a loose file's name that marks it as this family's release
    example: str  # the file VBench / cf's defaults use, for the missing-weights message
    source: str  # where to get them


FAMILIES = {
    "dino": Family("dino", "DINO ViT weights", r"^dino_(deit|vit)",
                   "dino_vitbase16_pretrain.pth (ViT-B/16; S/16, S/8, B/8 work too)",
                   "github.com/facebookresearch/dino, or the Hugging Face repos "
                   "timm/vit_base_patch16_224.dino and facebook/dino-vitb16"),
    "dinov2": Family("dinov2", "DINOv2 ViT weights", r"^dinov2_vit",
                     "dinov2_vitb14_pretrain.pth (ViT-B/14; S/14 and L/14 work too)",
                     "github.com/facebookresearch/dinov2, or the Hugging Face repos "
                     "timm/vit_base_patch14_dinov2.lvd142m and facebook/dinov2-base"),
    "clip": Family("clip", "CLIP ViT image-tower weights", r"clip|^ViT-[BLH]-\d+.*\.pt$|^vit_[bl]_\d+-",
                   "a snapshot of timm/vit_base_patch32_clip_224.openai, or OpenAI's ViT-B-32.pt "
                   "(ViT-B/32; B/16 and L/14 work too)",
                   "the Hugging Face repos timm/vit_base_patch32_clip_224.openai, "
                   "openai/clip-vit-base-patch32 or laion/CLIP-ViT-B-32-laion2B-s34B-b79K, or OpenAI's CLIP "
                   "release"),
}


@dataclass(frozen=True)
class Source:
    """One set of weights: `file`, described by the `configs` of its snapshot folder (name -> JSON)."""

    file: Path
    configs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """How outputs name these weights: the file, or the repo of a snapshot (``timm/vit_...dino``)."""
        if self.file.name not in HF_WEIGHT_FILES:
            return self.file.name
        for part in reversed(self.file.parts[:-1]):
            if part.startswith("models--"):  # the Hugging Face cache: models--org--name/snapshots/<rev>
                return part[len("models--"):].replace("--", "/")
        return f"{self.file.parent.name}/{self.file.name}"


def read_configs(folder: Path, strict: bool) -> dict:
    """The snapshot config files in `folder` (name -> parsed JSON). Unparsable ones are an error when
    `strict` (the user named this folder), else ignored (someone else's folder met during a search)."""
    out = {}
    for name in CONFIG_FILES:
        p = folder / name
        if p.is_file():
            try:
                out[name] = json.loads(p.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                if strict:
                    raise CfError(f"cannot read {str(p)!r}: {e}; expected the JSON config of a timm, "
                                  f"open_clip or transformers snapshot (re-download it)") from None
    return out


def family_of(configs: dict) -> str | None:
    """Which backbone family a snapshot folder's configs describe (None: none of cf's)."""
    if "open_clip_config.json" in configs:
        return "clip"
    cfg = configs.get("config.json")
    if not isinstance(cfg, dict):
        return None
    model_type = cfg.get("model_type")
    if model_type is not None:  # transformers
        return TRANSFORMERS_TYPES.get(model_type)
    arch = str(cfg.get("architecture", "")).lower()  # timm
    tag = str((cfg.get("pretrained_cfg") or {}).get("tag", "")).lower()
    if "dinov2" in arch:
        return "dinov2"
    if "clip" in arch:
        return "clip"
    if arch.startswith("vit_") and tag.startswith("dino"):
        return "dino"
    return None


def describe_configs(configs: dict) -> str:
    cfg = configs.get("config.json") or {}
    if "model_type" in cfg:
        return f"a transformers {cfg.get('model_type')!r} model"
    if "architecture" in cfg:
        tag = (cfg.get("pretrained_cfg") or {}).get("tag")
        return f"the timm model {cfg['architecture']}{'.' + tag if tag else ''}"
    return "an unknown model"


def snapshot_source(folder: Path, configs: dict, family: str) -> Source:
    for name in SNAPSHOT_FILES[family]:
        if (folder / name).is_file():
            return Source((folder / name).resolve(), configs)
    raise CfError(f"snapshot folder {str(folder)!r} has {', '.join(configs)} but no weight file (expected "
                  f"one of {', '.join(SNAPSHOT_FILES[family])}); the download is incomplete: fetch the "
                  f"weights too")


def file_source(path: Path) -> Source:
    """A weight file the user named; the configs beside it count only if it has a snapshot's file name."""
    configs = read_configs(path.parent, strict=True) if path.name in HF_WEIGHT_FILES else {}
    return Source(path.resolve(), configs)


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) and not name.startswith(".")


def candidates(root: Path, family: Family) -> tuple[list[Path], list[Path]]:
    """(this family's snapshot folders and loose files under `root`, unrecognised weight files)."""
    found: list[Path] = []
    unknown: list[Path] = []
    pattern = re.compile(family.loose_names, re.IGNORECASE)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        here = Path(dirpath)
        configs = read_configs(here, strict=False)
        if configs:  # a snapshot: its files are its own, never loose candidates
            if family_of(configs) == family.name:
                found.append(here)
            continue
        for f in sorted(filenames):
            if _is_weight_file(f):
                (found if pattern.search(f) else unknown).append(here / f)
    return found, unknown


def _pick(root: Path, family: Family, who: str, unknown: list[Path]) -> Source | None:
    """The one candidate under `root` (None: none; several: an error listing them). Weight files that
    are nobody's by name are added to `unknown`, for the message when nothing is found."""
    found, others = candidates(root, family)
    unknown += others
    if len(found) > 1:
        listed = "\n  ".join(str(p) for p in found)
        raise CfError(f"{who}: {str(root)!r} holds {len(found)} candidate {family.what}:\n  {listed}\n"
                      f"pass the one to use with --weights PATH (cf score) or bench.weights=PATH")
    if found:
        hit = found[0]
        if hit.is_dir():
            return snapshot_source(hit, read_configs(hit, strict=True), family.name)
        return file_source(hit)
    return None


def locate(family_name: str, weights: str | None, *, who: str, option: str) -> Source:
    """The weights `bench.weights` (or torch's hub cache) holds for `family_name`; see the module doc."""
    family = FAMILIES[family_name]
    searched, unknown = [], []
    if weights:
        path = Path(weights).expanduser()
        if not path.exists():
            raise MissingWeightsError(f"{who}: bench.weights={weights!r} does not exist; expected a weight "
                                      f"file or a folder holding {family.what} (e.g. {family.example})")
        if path.is_file() and path.suffix != ".json":
            return file_source(path)
        folder = path if path.is_dir() else path.parent
        configs = read_configs(folder, strict=True)
        if configs:
            found = family_of(configs)
            if found != family_name:
                raise CfError(f"{who}: {str(folder)!r} holds {describe_configs(configs)} "
                              f"({', '.join(configs)}), not {family.what}"
                              + (f"; it is for backbone {found!r}" if found else "")
                              + f". Pass {family.what} with {option}")
            return snapshot_source(folder, configs, family_name)
        hit = _pick(folder, family, who, unknown)
        if hit is not None:
            return hit
        searched.append(str(folder))
    hub = hub_checkpoints_dir()
    if hub.is_dir():
        hit = _pick(hub, family, who, [])  # the cache holds other consumers' files
        if hit is not None:
            return hit
    searched.append(f"{hub} (torch hub cache)")
    note = ""
    if unknown:
        names = ", ".join(p.name for p in unknown[:5])
        note = (f" Weight files whose name does not say they are {family.what} were left alone ({names}); "
                f"to use one, pass the file itself.")
    raise MissingWeightsError(
        f"{who} needs {family.what}, e.g. {family.example}; not found in {', '.join(searched)}.{note} "
        f"Get them from {family.source}, put them on this machine and pass the file or its folder with "
        f"{option}. cf never downloads weights."
    )
