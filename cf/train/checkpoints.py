"""Reading checkpoints (always weights_only=True) and exporting weights as .safetensors; `cf.train.base`
re-exports all three."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cf.errors import CfError
from cf.utils import atomic_path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as a dict, on the CPU, read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CfError(f"checkpoint {str(path)!r} does not exist; train the stage that writes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError for unsafe or damaged files
        raise CfError(
            f"cannot read checkpoint {str(path)!r} with weights_only=True: {str(e).splitlines()[0]}"
        ) from e


def load_module_weights(
    path: str | Path, prefix: str = "", ema_key: str | None = None
) -> dict[str, torch.Tensor]:
    """The module weights in a checkpoint, for `load_state_dict` (a stage hand-off).

    prefix: keep only keys starting with it, stripped (e.g. "net." for the network alone).
    ema_key: also replace the parameters by the EMA averages stored in `checkpoint[ema_key]`
        (an `EMA.state_dict()` of the submodule under `prefix`); buffers stay as saved.
    """
    ckpt = load_checkpoint(path)
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not weights:
        raise CfError(
            f"checkpoint {str(path)!r} has no weights under prefix {prefix!r}; "
            f"its keys start with {sorted({k.split('.')[0] + '.' for k in ckpt['state_dict']})}"
        )
    if ema_key is not None:
        if ema_key not in ckpt:
            raise CfError(f"checkpoint {str(path)!r} has no {ema_key!r} entry; it has {sorted(ckpt)}")
        shadow = ckpt[ema_key]["shadow"]
        unknown = shadow.keys() - weights.keys()
        if unknown or not shadow:
            raise CfError(
                f"the EMA in {str(path)!r} does not match the weights under prefix {prefix!r} "
                f"(unknown keys {sorted(unknown)[:5]}); pass the prefix of the module the EMA tracked"
            )
        weights.update(shadow)
    return weights


def export_safetensors(
    module: nn.Module | dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a module's state dict (or a dict of tensors) as .safetensors, atomically."""
    from safetensors.torch import save_file

    state = module.state_dict() if isinstance(module, nn.Module) else module
    # clone: tied weights share storage, which safetensors refuses
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(path, fsync=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
    return Path(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header's `__metadata__` in key order, in place: safetensors writes it in the order of
    a Rust HashMap, which changes from process to process, so equal weights would not give equal bytes
    (and a redone or resumed stage would not hash the same). The header keeps its length."""
    import json
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) <= n:
            f.seek(8)
            f.write(raw.ljust(n, b" "))
