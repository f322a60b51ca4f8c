"""Building a model for a device at run time: dtype, autocast, attention kernels, compile, weights."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from cf.errors import CfError
from cf.model.dit import CausalVideoDiT

_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION"}


def param_dtype(model_cfg, device: torch.device) -> torch.dtype:
    """Parameters stay fp32 under `auto` (bf16 comes from autocast on CUDA); fp64 and explicit
    half types convert the weights."""
    table = {"fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
    return table.get(model_cfg.dtype, torch.float32)


def precision(model_cfg, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context to run the model in: bf16 autocast on CUDA for `auto`, else nothing."""
    device = torch.device(device)
    if model_cfg.dtype == "auto" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attention_kernels(model_cfg) -> contextlib.AbstractContextManager:
    """Pin SDPA to `model.attention_backend` (auto lets torch pick per call)."""
    if model_cfg.attention_backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _BACKENDS[model_cfg.attention_backend])])


def build_model(cfg, device: torch.device | str = "cpu", weights: str | Path | None = None) -> CausalVideoDiT:
    """A CausalVideoDiT from the config on `device`, with weights from a checkpoint if given.

    `model.compile` wraps `forward` with torch.compile (the module stays the same object, so
    its state_dict keys do not change).
    """
    model = CausalVideoDiT(cfg.model, cfg.data)
    if weights is not None:
        load_weights(model, weights)
    model = model.to(device=device, dtype=param_dtype(cfg.model, torch.device(device))).keep_fp32()
    if cfg.model.compile:
        model.forward = torch.compile(model.forward)
    return model


def load_weights(model: torch.nn.Module, path: str | Path, prefix: str = "model.") -> None:
    """Load a .safetensors file, or a Lightning checkpoint's `state_dict` (keys under `prefix`).

    torch.load runs with weights_only=True: a checkpoint can never execute code.
    """
    path = Path(path)
    if not path.is_file():
        raise CfError(f"checkpoint {str(path)!r} does not exist; "
                      f"pass the path of a .ckpt or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a corrupt or foreign file
            raise CfError(f"cannot load checkpoint {str(path)!r}: {e}") from None
        state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
        if state is None:
            raise CfError(f"checkpoint {str(path)!r} holds no state_dict")
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CfError(
            f"checkpoint {str(path)!r} does not fit this model (check --preset and model.* overrides): "
            f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
