"""Wan's own text-encoder and VAE files (`models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth`), read into
diffusers' / transformers' classes (`UMT5EncoderModel`, `AutoencoderKLWan`) by renaming their tensors.

The original layouts are Wan2.1's `wan/modules/t5.py` (`T5Encoder`: `token_embedding`, `blocks.N.{norm1,
attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}`, `norm`; UMT5 has a relative position
table per block) and `wan/modules/vae.py` (`WanVAE_`: `encoder` / `decoder` with `conv1`, `middle.{0,1,2}`,
flat `downsamples` / `upsamples` lists of residual blocks (`residual.{0,2,3,6}`, `shortcut`) and resamples
(`resample.1`, `time_conv`), `head.{0,2}`; `conv1` / `conv2` around the latent). The architectures are read
from the tensors' shapes; what no shape holds is Wan's fixed choice: the T5 relative-position range (128),
and the VAE's latent mean and std (Wan's 16-channel values, which are diffusers' defaults).

Files are read with `torch.load(weights_only=True)`, memory-mapped when they are zip archives (a bf16
UMT5-XXL is 11 GB); the networks are built on the meta device and take the file's tensors as they are, so
nothing is allocated twice.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from cf.errors import CfError

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
T5_TOKENIZER = "google/umt5-xxl"  # beside the .pth in Wan's release
T5_MAX_DISTANCE = 128  # T5RelativeEmbedding(max_dist=128) in Wan's t5.py: no tensor holds it


def load_pth(path: str | Path, what: str) -> dict[str, Tensor]:
    """A state dict from a .pth file, weights_only (memory-mapped when the file is a zip archive)."""
    from cf.filecheck import check_weights, kind

    path = check_weights(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=kind(path) == "zip")
    except Exception as e:  # noqa: BLE001 - torch raises many types for files it cannot read
        raise CfError(f"cannot load {what} {str(path)!r} with torch.load(weights_only=True): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CfError(f"{what} {str(path)!r} is not a state dict of tensors; pass Wan's own {path.name}")
    return state


def _refuse(what: str, source: str, missing: list[str]) -> CfError:
    return CfError(f"{source} is not {what} in Wan's own layout: no {', '.join(missing[:3])}; pass Wan's "
                   f"release file (docs/wan.md) or the diffusers folder")


# --------------------------------------------------------------------------------------------- UMT5


def umt5_to_transformers(state: dict[str, Tensor], source: str = "the file"
                         ) -> tuple[dict, dict[str, Tensor]]:
    """Wan's T5Encoder tensors -> (UMT5Config keyword arguments, UMT5EncoderModel state dict)."""
    need = ["token_embedding.weight", "norm.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
            "blocks.0.pos_embedding.embedding.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise _refuse("a UMT5 text encoder", source, missing)
    layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    vocab, dim = state["token_embedding.weight"].shape
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    config = dict(
        vocab_size=int(vocab), d_model=int(dim),
        d_kv=int(state["blocks.0.attn.q.weight"].shape[0]) // int(heads),
        d_ff=int(state["blocks.0.ffn.fc1.weight"].shape[0]), num_layers=layers, num_heads=int(heads),
        relative_attention_num_buckets=int(buckets), relative_attention_max_distance=T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    per_block = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch it multiplies
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = t
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = t
        elif (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key)) and m[2] in per_block:
            out[f"encoder.block.{m[1]}.{per_block[m[2]]}"] = t
        else:
            raise CfError(f"{source}: unexpected tensor {key} for Wan's T5 encoder (a decoder, or another "
                          f"model?); pass {T5_FILE}")
    return config, out


def load_umt5_pth(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """`models_t5_umt5-xxl-enc-bf16.pth` -> a transformers UMT5EncoderModel (eval, on device, in dtype)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config, state = umt5_to_transformers(load_pth(path, "Wan's T5 encoder"), str(path))
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config))
    _assign(model, _cast(state, dtype), str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- VAE

_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight",
             "residual.2.bias": "conv1.bias", "residual.3.gamma": "norm2.gamma",
             "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_ENDS = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_OUTER = {"conv1": "quant_conv", "conv2": "post_quant_conv"}


def vae_to_diffusers(state: dict[str, Tensor], source: str = "the file", latents_mean=None,
                     latents_std=None) -> tuple[dict, dict[str, Tensor]]:
    """WanVAE_ tensors -> (AutoencoderKLWan keyword arguments, its state dict)."""
    need = ["encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight", "conv2.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise _refuse("a Wan VAE", source, missing)
    down = _stages(state, "encoder.downsamples", source)
    up = _stages(state, "decoder.upsamples", source)
    base = int(state["encoder.conv1.weight"].shape[0])
    z_dim = int(state["conv2.weight"].shape[0])
    n_res = len(down[0]["residual"])  # the decoder's stages hold one more (Wan's Decoder3d)
    if any(len(s["residual"]) != n_res for s in down) or any(len(s["residual"]) != n_res + 1 for s in up):
        raise CfError(f"{source}: the VAE's stages hold unequal numbers of residual blocks; not Wan2.1's VAE")
    dims = [int(state[f"encoder.downsamples.{s['residual'][-1]}.residual.6.weight"].shape[0]) for s in down]
    config = dict(
        base_dim=base, z_dim=z_dim, dim_mult=[d // base for d in dims], num_res_blocks=n_res,
        attn_scales=[], temperal_downsample=[s["temporal"] for s in down[:-1]],
    )
    if latents_mean is not None or latents_std is not None:
        config.update(latents_mean=list(latents_mean), latents_std=list(latents_std))
    elif z_dim != 16:  # Wan's mean / std are for its 16 latent channels (AutoencoderKLWan's defaults)
        raise CfError(f"{source} has {z_dim} latent channels; Wan's latent mean and std are for 16: pass "
                      f"latents_mean= and latents_std= for this VAE")
    rename: dict[str, str] = {}
    for side, stages, blocks in (("encoder", down, "down_blocks"), ("decoder", up, "up_blocks")):
        flat = 0 if side == "encoder" else None
        for i, s in enumerate(stages):
            for j, k in enumerate(s["residual"]):
                new = f"{blocks}.{k}" if flat is not None else f"{blocks}.{i}.resnets.{j}"
                rename[f"{side}.{'downsamples' if flat is not None else 'upsamples'}.{k}."] = f"{side}.{new}."
            if s["resample"] is not None:
                k = s["resample"]
                new = f"{blocks}.{k}" if flat is not None else f"{blocks}.{i}.upsamplers.0"
                rename[f"{side}.{'downsamples' if flat is not None else 'upsamples'}.{k}."] = f"{side}.{new}."
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        out[_vae_name(key, rename, source)] = t
    return config, out


def _stages(state: dict[str, Tensor], prefix: str, source: str) -> list[dict]:
    """The flat list `prefix.K` cut into stages: residual blocks, then the resample that ends a stage."""
    found = sorted({int(m[1]) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))})
    if not found:
        raise _refuse("a Wan VAE", source, [f"{prefix}.0"])
    stages, cur = [], {"residual": [], "resample": None, "temporal": False}
    for k in found:
        p = f"{prefix}.{k}."
        if f"{p}residual.0.gamma" in state:
            cur["residual"].append(k)
        elif f"{p}resample.1.weight" in state:
            cur["resample"], cur["temporal"] = k, f"{p}time_conv.weight" in state
            stages.append(cur)
            cur = {"residual": [], "resample": None, "temporal": False}
        else:
            raise CfError(f"{source}: {prefix}.{k} is neither a residual block nor a resample (attention "
                          f"inside a stage?); only Wan2.1's VAE layout is read")
    stages.append(cur)
    return stages


def _vae_name(key: str, rename: dict[str, str], source: str) -> str:
    for old, new in rename.items():
        if key.startswith(old):
            rest = key[len(old):]
            return new + _RESIDUAL.get(rest, rest)
    parts = key.split(".")
    if parts[0] in ("encoder", "decoder"):
        side, rest = parts[0], ".".join(parts[1:])
        if parts[1] == "middle":
            head = f"mid_block.{_MIDDLE[parts[2]]}"
            tail = ".".join(parts[3:])
            return f"{side}.{head}.{_RESIDUAL.get(tail, tail)}"
        for old, new in _ENDS.items():
            if rest.startswith(old + "."):
                return f"{side}.{new}{rest[len(old):]}"
    elif parts[0] in _OUTER:
        return ".".join([_OUTER[parts[0]], *parts[1:]])
    raise CfError(f"{source}: unexpected tensor {key} for Wan's VAE; pass {VAE_FILE}")


def load_vae_pth(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32, latents_mean=None,
                 latents_std=None):
    """`Wan2.1_VAE.pth` -> a diffusers AutoencoderKLWan (eval, on device, in dtype)."""
    from diffusers import AutoencoderKLWan

    config, state = vae_to_diffusers(load_pth(path, "Wan's VAE"), str(path), latents_mean, latents_std)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    _assign(vae, _cast(state, dtype), str(path))
    return vae.to(device).eval()


def _cast(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor in `dtype`, a tensor held under two names (UMT5's tied embedding) converted once."""
    done: dict[int, Tensor] = {}
    for v in state.values():
        if id(v) not in done:
            done[id(v)] = v.to(dtype)
    return {k: done[id(v)] for k, v in state.items()}


def _assign(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load `state` into a meta-device `model` by assignment, refusing missing, extra or misshapen tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        detail = "; ".join(x for x in (
            f"missing: {', '.join(missing[:3])}" if missing else "",
            f"unexpected: {', '.join(extra[:3])}" if extra else "",
            f"wrong shape: {', '.join(shapes[:2])}" if shapes else "") if x)
        raise CfError(f"{source} does not fit the network its shapes describe ({detail}); "
                      f"pass Wan's own file")
    model.load_state_dict(state, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CfError(f"{source} leaves {', '.join(left[:3])} unset; pass Wan's own file")
