"""Reading Wan2.1 transformer weights from local files into cf's CausalVideoDiT.

Layouts accepted (docs/wan.md):

- a diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` or shards with their
  `*.safetensors.index.json` (the folder itself, or the `transformer/` folder of a diffusers pipeline);
- Wan's own release: `config.json` (`WanModel`) + safetensors (or `.pth`) in the original naming;
- a single file (`--ckpt`): `.safetensors`, or a `.pt` / `.pth` / `.ckpt` dict, possibly holding the
  network under `generator_ema` / `generator` (Self-Forcing, Context Forcing, LongLive; the EMA is
  preferred) and under wrapper prefixes (`model.`, `_orig_mod.`, ...), in either naming;
- a peft LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`, LongLive's), merged into the
  base at load: W += (alpha / r) B A (alpha / sqrt(r) with rslora).

The architecture is read from the files (config.json; the tensors' shapes for a bare checkpoint), every
`torch.load` runs with `weights_only=True`, and a file that does not fit is refused naming the file,
its first mismatched tensors and the fix.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from cf.errors import CfError
from cf.wan.convert import (
    GENERATOR_KEYS,
    WanConfig,
    check_fits,
    diffusers_to_cf,
    model_overrides,
    naming,
    original_module_to_diffusers,
    strip_wrappers,
    to_diffusers_names,
)

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclass
class WanWeights:
    """A Wan transformer read from files: its architecture and cf-named tensors."""

    config: WanConfig
    state: dict[str, Tensor]  # cf names
    sources: list[str] = field(default_factory=list)  # what was read, in order (for the run's JSON)
    origin: str = "weights"  # the file or folder the tensors came from (named when they do not fit)

    def build(
        self,
        data_cfg=None,
        *,
        height: int = 60,
        width: int = 104,
        frames_per_chunk: int = 3,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        text_pad_tokens: int | None = None,
    ):
        """A CausalVideoDiT with these weights (frames of `height` x `width` latents). text_pad_tokens
        overrides Wan's 512 padded text tokens (shorter is cheaper, no longer Wan's function: tests only)."""
        from types import SimpleNamespace

        from cf.config.schema import ModelConfig
        from cf.model import CausalVideoDiT

        keys = {**model_overrides(self.config), "frames_per_chunk": frames_per_chunk}
        if text_pad_tokens is not None:
            keys["text_pad_tokens"] = text_pad_tokens
        m = ModelConfig(**keys)
        d = data_cfg if data_cfg is not None else SimpleNamespace(height=height, width=width)
        model = CausalVideoDiT(m, d)
        check_fits(
            self.state,
            model,
            self.origin,
            "Pass the transformer that matches the config it was read with (--weights DIR holds the "
            "config.json of the base model the --ckpt / --lora were trained from)",
        )
        model.load_state_dict(self.state, strict=True)
        return model.to(device=device, dtype=dtype).keep_fp32()


# ------------------------------------------------------------------------------------------- files
def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """One weights file: safetensors, or a torch pickle through weights_only=True. A dict holding a
    generator (`generator_ema` first) or a `state_dict` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CfError(
            f"weights file {str(path)!r} does not exist; pass the path of a .safetensors / .pt file"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CfError(f"cannot read {str(path)!r} as safetensors: {e}") from None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, foreign, or a pickle that is more than tensors
        raise CfError(
            f"cannot load {str(path)!r} with torch.load(weights_only=True): {e}; "
            f"convert it to safetensors or pass a plain state dict"
        ) from None
    return unwrap(blob, str(path))


def unwrap(blob, source: str) -> dict[str, Tensor]:
    """A checkpoint dict -> the tensors of one network (Self-Forcing's `generator_ema` preferred)."""
    for _ in range(3):
        if not isinstance(blob, dict):
            break
        if blob and all(isinstance(v, Tensor) for v in blob.values()):
            return blob
        for key in GENERATOR_KEYS:
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
        else:
            dicts = [k for k, v in blob.items() if isinstance(v, dict)]
            if len(dicts) == 1:
                blob = blob[dicts[0]]
            else:
                break
    if isinstance(blob, dict) and blob and all(isinstance(v, Tensor) for v in blob.values()):
        return blob
    keys = list(blob)[:6] if isinstance(blob, dict) else type(blob).__name__
    raise CfError(
        f"{source} holds no transformer state dict (top-level: {keys}); expected tensors, or a dict "
        f"with one of {', '.join(GENERATOR_KEYS)}"
    )


def _safetensors_in(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CfError(
                f"{index[0]} lists shards that are not in {folder}: {missing[:3]}; "
                f"download every shard of the model"
            )
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def transformer_folder(weights: str | Path) -> Path:
    """The folder holding the transformer: `DIR/transformer` in a diffusers pipeline, else DIR."""
    d = Path(weights)
    if not d.is_dir():
        raise CfError(
            f"--weights {str(d)!r} is not a folder; pass the Wan model's folder (a diffusers "
            f"pipeline, its transformer/ folder, or Wan's own release)"
        )
    return d / "transformer" if (d / "transformer" / "config.json").is_file() else d


def read_config(folder: Path) -> WanConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CfError(f"{folder} has no config.json; pass a Wan transformer folder (diffusers or Wan's own)")
    return WanConfig.from_json(json.loads(path.read_text()), str(path))


def read_folder(weights: str | Path) -> tuple[WanConfig, dict[str, Tensor], str]:
    """(config, diffusers-named tensors, description) of a transformer folder."""
    folder = transformer_folder(weights)
    wc = read_config(folder)
    files = _safetensors_in(folder)
    if not files:
        files = sorted(p for p in folder.iterdir() if p.suffix in TORCH_SUFFIXES)
    if not files:
        raise CfError(f"{folder} has a config.json but no weights (*.safetensors or .pt/.pth)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_tensors(f))
    return wc, to_diffusers_names(state), str(folder)


# --------------------------------------------------------------------------------------------- LoRA
def read_lora(path: str | Path, lora_alpha: float | None = None) -> tuple[dict[str, Tensor], dict, str]:
    """(tensors, adapter_config, source) of a peft adapter: a folder, or a weights file next to its
    adapter_config.json. A bare file of lora_A / lora_B tensors (a training run's own save) needs
    `lora_alpha` instead (the rank is read from the tensors)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        if lora_alpha is not None and p.is_file():
            return load_tensors(p), {"lora_alpha": float(lora_alpha)}, str(p)
        raise CfError(
            f"LoRA {str(p)!r}: no adapter_config.json beside it (peft's adapter format: the folder "
            f"`save_pretrained` writes), whose lora_alpha and r decide the merge scale; add it, or pass "
            f"lora_alpha (the training config's) with the file"
        )
    config = json.loads(cfg_path.read_text())
    if config.get("use_dora"):
        raise CfError(
            f"{cfg_path}: use_dora=true; cf merges plain LoRA only (merge the DoRA adapter with peft "
            f"and pass the merged model)"
        )
    if p.is_dir():
        files = [f for f in (p / "adapter_model.safetensors", p / "adapter_model.bin") if f.is_file()]
        if not files:
            raise CfError(f"LoRA folder {str(p)!r} has no adapter_model.safetensors (or .bin)")
        p = files[0]
    return load_tensors(p), config, str(p)


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def merge_lora(
    state: dict[str, Tensor], lora: dict[str, Tensor], config: dict, source: str, scale: float = 1.0
) -> int:
    """Merge a peft LoRA into a diffusers-named state in place: W += s * B @ A per adapted module.
    Returns the number of modules merged; refuses adapters of modules the model does not have."""
    lora = strip_wrappers({k.replace(".default.", "."): v for k, v in lora.items()})
    if naming(k.split(".lora_")[0] + ".weight" for k in lora) == "original":
        lora = {
            original_module_to_diffusers(k.split(".lora_")[0]) + ".lora_" + k.split(".lora_")[1]: v
            for k, v in lora.items()
        }
    modules = sorted({k.split(".lora_")[0] for k in lora if ".lora_A." in k})
    if not modules:
        raise CfError(
            f"{source} holds no lora_A / lora_B tensors (keys like {list(lora)[:3]}); pass a peft "
            f"LoRA adapter"
        )
    alpha0, use_rs = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))  # peft default 8
    bad = [m for m in modules if f"{m}.weight" not in state]
    if bad:
        raise CfError(
            f"{source} adapts modules the base model does not have: {bad[:3]}; the LoRA was trained "
            f"on another base (pass that base with --weights / --ckpt)"
        )
    for m in modules:
        a, b = lora[f"{m}.lora_A.weight"].double(), lora[f"{m}.lora_B.weight"].double()
        w = state[f"{m}.weight"]
        r = a.shape[0]
        alpha = float(_pattern(config.get("alpha_pattern") or {}, m, alpha0))
        s = scale * (alpha / math.sqrt(r) if use_rs else alpha / r)
        delta = (b @ a) * s
        if delta.shape != w.shape:
            raise CfError(
                f"{source}: LoRA of {m} gives a {tuple(delta.shape)} update for a {tuple(w.shape)} "
                f"weight; the LoRA was trained on another base"
            )
        state[f"{m}.weight"] = (w.double() + delta).to(w.dtype)
        if f"{m}.lora_B.bias" in lora:  # peft's lora_bias option
            state[f"{m}.bias"] = (
                state[f"{m}.bias"] + lora[f"{m}.lora_B.bias"].to(state[f"{m}.bias"].dtype) * s
            )
    return len(modules)


# ---------------------------------------------------------------------------------------- together
def read_wan(
    weights: str | Path | None = None,
    ckpt: str | Path | None = None,
    lora: str | Path | None = None,
    *,
    heads: int | None = None,
    lora_scale: float = 1.0,
    lora_alpha: float | None = None,
) -> WanWeights:
    """The transformer: the base from the `weights` folder, its tensors replaced by `ckpt` if given
    (Self-Forcing / Context Forcing / LongLive generators), then `lora` merged. The architecture comes from
    the folder's config.json, or from ckpt's shapes when no folder is given (heads: `heads`, else dim/128)."""
    if weights is None and ckpt is None:
        raise CfError("no Wan weights: pass --weights DIR (a Wan2.1 T2V folder) and/or --ckpt FILE")
    sources: list[str] = []
    wc = None
    state: dict[str, Tensor] | None = None
    if weights is not None:
        if ckpt is None:
            wc, state, src = read_folder(weights)
            sources.append(src)
        else:  # the folder gives the architecture, the checkpoint the tensors (the base is not read)
            folder = transformer_folder(weights)
            wc = read_config(folder)
            sources.append(str(folder / "config.json"))
    if ckpt is not None:
        state = to_diffusers_names(load_tensors(ckpt))
        if "patch_embedding.weight" not in state:
            raise CfError(
                f"{ckpt} is not a Wan transformer checkpoint: no patch_embedding.weight among "
                f"{len(state)} tensors (first keys {list(state)[:3]}); pass the generator checkpoint "
                f"of a Wan-based model (Self-Forcing / Context Forcing / LongLive) or a Wan folder"
            )
        if wc is None:
            wc = WanConfig.from_state(state, heads)
        sources.append(str(ckpt))
    assert wc is not None and state is not None
    wc.check(sources[0])
    if lora is not None:
        tensors, config, src = read_lora(lora, lora_alpha)
        merge_lora(state, tensors, config, src, lora_scale)
        sources.append(src)
    origin = str(ckpt) if ckpt is not None else sources[0]  # where the tensors came from
    try:
        converted = diffusers_to_cf(state, wc)
    except RuntimeError as e:  # a reshape of a tensor whose size does not fit the config
        raise CfError(
            f"{origin} does not fit the config {sources[0]} ({e}); pass the --weights folder of the "
            f"base model this checkpoint was trained from"
        ) from None
    return WanWeights(config=wc, state=converted, sources=sources, origin=origin)
