"""Finding and reading pretrained weights from local files only. Nothing here ever downloads.

A consumer names what it needs in a `WeightSpec`; `find_weights` looks for it in the place the user
named (`bench.weights`, a file or a folder) and in torch's hub cache (``$TORCH_HOME/hub/checkpoints``),
and raises `MissingWeightsError` saying which file is needed and how to pass it when nothing is found.
(The DINO / DINOv2 / CLIP backbones find theirs by layout instead: `cf.metrics.weights_layouts`.)

Reading never runs pickled code: torch files load with ``weights_only=True`` (DINO's training
checkpoints store an ``argparse.Namespace``, the one non-tensor class allowed, and only while reading),
safetensors files through safetensors. A file that is not weights raises `CfError` naming the file,
what was expected and what to do, never a torch / safetensors traceback.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cf.errors import CfError

# File names that Hugging Face snapshots of timm / open_clip / transformers models use.
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                   "pytorch_model.bin")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
STATE_DICT_FIX = ("pass a state dict saved with torch.save or safetensors (a .pth / .pt / .bin / "
                  ".safetensors file) with --weights PATH (cf score) or bench.weights=PATH")


class MissingWeightsError(CfError):
    """Pretrained weights that are not on this machine; the message says what to get and how to pass it."""


@dataclass(frozen=True)
class WeightSpec:
    what: str  # e.g. "DINO ViT-B/16 weights"
    files: tuple[str, ...] = ()  # exact file names that hold these weights
    prefixes: tuple[str, ...] = ()  # or any `<prefix>*.pth` (torchvision names end in a hash)
    hf_dirs: tuple[str, ...] = ()  # or an HF_WEIGHT_FILES file in a folder whose path contains one
    source: str = ""  # where a user gets them, for the error message

    def matches(self, path: Path) -> bool:
        name = path.name
        if name in self.files:
            return True
        if any(name.startswith(p) and name.endswith(".pth") for p in self.prefixes):
            return True
        return name in HF_WEIGHT_FILES and any(d in str(path.parent) for d in self.hf_dirs)

    def describe(self) -> str:
        names = [*self.files, *(f"{p}*.pth" for p in self.prefixes)]
        names += [f"a Hugging Face snapshot folder named like '*{d}*'" for d in self.hf_dirs]
        return f"{self.what} ({' or '.join(names)}{'; ' + self.source if self.source else ''})"


def hub_checkpoints_dir() -> Path:
    """torch's local cache of downloaded checkpoints; only read, never filled by cf."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _search_dir(root: Path, spec: WeightSpec) -> Path | None:
    if not root.is_dir():
        return None
    found = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        found += [Path(dirpath) / f for f in filenames if spec.matches(Path(dirpath) / f)]
    return sorted(found)[0] if found else None


def find_weights(spec: WeightSpec, weights: str | None, *, who: str, for_backbone: bool, option: str) -> Path:
    """The local file holding `spec`'s weights.

    `weights` is `bench.weights`: a file is taken as it is when `for_backbone` (it is the feature
    backbone's own file) or when its name matches `spec`; otherwise its folder is searched. A folder is
    searched recursively by file name. torch's hub cache is searched last. `who` (e.g. "backbone 'dino'")
    and `option` (how the user passes a path) make the error message.
    """
    searched = []
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            if for_backbone or spec.matches(path):
                return path.resolve()
            path = path.parent
        if not path.exists():
            raise MissingWeightsError(f"{who}: bench.weights={weights!r} does not exist; expected a weight "
                                      f"file or a folder holding {spec.describe()}")
        hit = _search_dir(path, spec)
        if hit is not None:
            return hit.resolve()
        searched.append(str(path))
    hub = hub_checkpoints_dir()
    hit = _search_dir(hub, spec)
    if hit is not None:
        return hit.resolve()
    searched.append(f"{hub} (torch hub cache)")
    raise MissingWeightsError(
        f"{who} needs {spec.describe()}; not found in {', '.join(searched)}. Put the file on this machine "
        f"and pass it (or a folder holding it) with {option}. cf never downloads weights."
    )


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive (torch.jit.save; OpenAI's CLIP ``ViT-B-32.pt``): a zip with compiled code."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _looks_like_safetensors(path: Path) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _why_unreadable(e: Exception) -> str:
    """A torch / safetensors exception -> one line a user can act on."""
    msg = str(e)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
    if unsupported:
        return (f"it holds a pickled Python object of type {unsupported.group(1)}, and cf reads only tensors "
                f"(torch.load with weights_only=True); re-save the state dict alone, e.g. "
                f"torch.save(checkpoint['teacher'], 'weights.pth')")
    if "Weights only load failed" in msg:
        return "it holds pickled Python objects other than tensors, and cf reads only tensors (weights_only)"
    if isinstance(e, (pickle.UnpicklingError, UnicodeDecodeError)) or "invalid load key" in msg:
        return "it is neither a torch checkpoint nor a safetensors file (it starts like neither)"
    if isinstance(e, EOFError) or "central directory" in msg or "PytorchStreamReader" in msg:
        return "it is truncated or damaged (an incomplete download or copy?)"
    if type(e).__name__ == "SafetensorError" or "deserializing header" in msg:
        return f"its safetensors header is damaged ({msg.splitlines()[0][:160]})"
    return f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"


def read_checkpoint(path: str | Path, what: str = "a state dict (a dict of tensors)",
                    fix: str = STATE_DICT_FIX) -> object:
    """What a weight file holds (safetensors: a dict of tensors; torch: whatever was saved, tensors and
    plain containers only). TorchScript archives are refused here: they load via `torch.jit.load`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CfError(f"{str(path)!r} is not a file; expected {what}. Fix: {fix}")
    if path.stat().st_size == 0:
        raise CfError(f"{str(path)!r} is empty; expected {what}. Fix: {fix}")
    if is_torchscript(path):
        raise CfError(f"{str(path)!r} is a TorchScript archive, not {what}. Fix: {fix}")
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            if zipfile.is_zipfile(path):
                # mmap: a training checkpoint (optimizer state, student and teacher) is not read in whole
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # some older archives cannot be mapped; read them plainly
                    pass
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types; all mean "not readable weights"
        raise CfError(f"cannot load weights from {str(path)!r}: {_why_unreadable(e)}. Expected {what}. "
                      f"Fix: {fix}") from None


def load_state_dict(path: str | Path) -> dict:
    """A state dict from .safetensors or a torch file (weights_only), unwrapped from common containers
    ({'state_dict': ...}, {'model': ...}, DINO's {'teacher': ...}) and stripped of 'module.' /
    'backbone.' prefixes."""
    sd = read_checkpoint(path)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise CfError(f"{str(path)!r} holds no state dict (a dict of tensors); got {type(sd).__name__}. "
                      f"Fix: {STATE_DICT_FIX}")
    for prefix in ("module.", "backbone."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_into(model, state_dict: dict, path: str | Path, what: str, ignore: tuple[str, ...] = ()) -> None:
    """Load `state_dict` into `model`; missing keys mean the file holds other weights: say so."""
    kept = {k: v for k, v in state_dict.items() if not k.startswith(ignore)}
    try:
        result = model.load_state_dict(kept, strict=False)
    except RuntimeError as e:  # shape mismatches: another architecture's weights
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise CfError(f"{str(path)!r} does not hold {what}: {first}; pass the right file with --weights / "
                      f"bench.weights") from None
    missing = [k for k in result.missing_keys if not k.startswith(ignore)]
    if missing:
        raise CfError(f"{str(path)!r} does not hold {what}: {len(missing)} weights missing "
                      f"(e.g. {', '.join(missing[:4])}); pass the right file with --weights / bench.weights")


def assign_exactly(model, state_dict: dict, path: str | Path, what: str) -> None:
    """Make `state_dict` (float32, already in `model`'s key names) the weights of `model`, which may live
    on the meta device (built without initialising). Every key must match, both ways."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = (("weights missing", missing), ("unexpected weights", extra), ("shapes differ", wrong))
    for problem, keys in problems:
        if keys:
            raise CfError(f"{str(path)!r} does not hold {what}: {len(keys)} {problem} (e.g. "
                          f"{', '.join(keys[:4])}); pass the right file with --weights / bench.weights")
    model.load_state_dict(state_dict, strict=True, assign=True)
