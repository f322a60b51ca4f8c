"""Wan2.1 transformer weights -> cf's CausalVideoDiT: the architecture, the names, the layouts.

Three namings reach here, all turned into diffusers' (the one `WanTransformer3DModel` uses) and then
into cf's:

    original Wan (Wan's own release, Self-Forcing / Context Forcing `generator(_ema)`, LongLive):
        blocks.0.self_attn.q.weight, blocks.0.norm3.weight, head.head.weight, time_projection.1.weight
    diffusers:
        blocks.0.attn1.to_q.weight, blocks.0.norm2.weight, proj_out.weight, condition_embedder.time_proj.*
    cf:
        blocks.0.attn.qkv.weight (q, k, v stacked), blocks.0.norm_cross.weight, head.weight, time_proj.1.*

What changes besides names: q/k/v (and the cross-attention's k/v) are stacked into one matrix, the
Conv3d patch embedding (kernel 1 x p x p) becomes a Linear over (c, p, q), the head's output rows are
reordered from Wan's (p, q, c) to cf's (c, p, q), and the [1, 6, D] / [1, 2, D] modulation tables lose
their leading 1. Everything else is the same function (docs/wan.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from cf.errors import CfError

# prefixes training frameworks put before the network's own names (Self-Forcing's wrapper `model.`,
# torch.compile's `_orig_mod.`, FSDP, DDP, peft)
WRAPPER_PREFIXES = (
    "_fsdp_wrapped_module.",
    "_orig_mod.",
    "module.",
    "model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
)
# dict keys under which Self-Forcing-style checkpoints hold generators, best first
GENERATOR_KEYS = ("generator_ema", "generator", "model", "state_dict")

# original Wan naming -> diffusers naming (module paths, without .weight / .bias)
_ORIG_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
_ORIG_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class WanConfig:
    """The transformer's architecture, as its files state it (diffusers' names)."""

    dim: int = 1536
    heads: int = 12
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    in_channels: int = 16
    out_channels: int = 16
    layers: int = 30
    patch: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: str | None = "rms_norm_across_heads"
    cross_attn_norm: bool = True
    text_len: int = 512

    @classmethod
    def from_json(cls, d: dict, source: str = "config.json") -> WanConfig:
        """From a diffusers `WanTransformer3DModel` config or Wan's own `WanModel` config.json."""
        if (
            d.get("image_dim")
            or d.get("added_kv_proj_dim")
            or d.get("model_type") in ("i2v", "flf2v", "vace")
        ):
            raise CfError(
                f"{source} describes an image-conditioned Wan (I2V/FLF2V/VACE); cf runs the text-to-"
                f"video transformer only: pass the T2V model's folder"
            )
        if "num_attention_heads" in d:  # diffusers
            heads = int(d["num_attention_heads"])
            return cls(
                dim=heads * int(d["attention_head_dim"]),
                heads=heads,
                ffn_dim=int(d["ffn_dim"]),
                freq_dim=int(d.get("freq_dim", 256)),
                text_dim=int(d.get("text_dim", 4096)),
                in_channels=int(d["in_channels"]),
                out_channels=int(d.get("out_channels") or d["in_channels"]),
                layers=int(d["num_layers"]),
                patch=tuple(d.get("patch_size", (1, 2, 2))),
                eps=float(d.get("eps", 1e-6)),
                qk_norm=d.get("qk_norm", "rms_norm_across_heads"),
                cross_attn_norm=bool(d.get("cross_attn_norm", True)),
            )
        if "num_heads" in d:  # Wan's own release
            return cls(
                dim=int(d["dim"]),
                heads=int(d["num_heads"]),
                ffn_dim=int(d["ffn_dim"]),
                freq_dim=int(d.get("freq_dim", 256)),
                text_dim=int(d.get("text_dim", 4096)),
                in_channels=int(d["in_dim"]),
                out_channels=int(d.get("out_dim", d["in_dim"])),
                layers=int(d["num_layers"]),
                patch=tuple(d.get("patch_size", (1, 2, 2))),
                eps=float(d.get("eps", 1e-6)),
                qk_norm="rms_norm_across_heads" if d.get("qk_norm", True) else None,
                cross_attn_norm=bool(d.get("cross_attn_norm", True)),
                text_len=int(d.get("text_len", 512)),
            )
        raise CfError(
            f"{source} is not a Wan transformer config (no num_attention_heads / num_heads); "
            f"pass the folder of a Wan2.1 T2V transformer (diffusers or Wan's own release)"
        )

    @classmethod
    def from_state(cls, state: dict[str, Tensor], heads: int | None = None) -> WanConfig:
        """Read the architecture off a diffusers-named state dict's shapes. The number of heads is not in
        any shape (q/k norms span all heads): `heads`, else Wan's head width of 128 (1.3B: 12, 14B: 40)."""
        pe = state["patch_embedding.weight"]
        dim = pe.shape[0]
        layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
        patch = tuple(pe.shape[2:])
        out = state["proj_out.weight"].shape[0] // math.prod(patch)
        heads = heads or max(1, dim // 128)
        return cls(
            dim=dim,
            heads=heads,
            ffn_dim=state["blocks.0.ffn.net.0.proj.weight"].shape[0],
            freq_dim=state["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            text_dim=state["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            in_channels=pe.shape[1],
            out_channels=out,
            layers=layers,
            patch=patch,
            qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state else None,
            cross_attn_norm="blocks.0.norm2.weight" in state,
        )

    def check(self, source: str) -> None:
        """Refuse what cf's network cannot express, naming the key and why."""
        if self.patch[0] != 1 or self.patch[1] != self.patch[2]:
            raise CfError(
                f"{source}: patch_size {list(self.patch)} is not (1, p, p); cf's DiT patches one "
                f"latent frame at a time with square patches"
            )
        if self.in_channels != self.out_channels:
            raise CfError(f"{source}: in_channels {self.in_channels} != out_channels {self.out_channels}")
        if self.qk_norm not in ("rms_norm_across_heads", None):
            raise CfError(f"{source}: qk_norm={self.qk_norm!r}; cf has Wan's rms_norm_across_heads or none")
        if not self.cross_attn_norm:
            raise CfError(f"{source}: cross_attn_norm=false; every Wan2.1 T2V release has it (cf's DiT too)")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise CfError(f"{source}: dim {self.dim} over {self.heads} heads is not an even head width")

    def as_dict(self) -> dict:
        return asdict(self)


def model_overrides(wc: WanConfig) -> dict:
    """The model.* keys that make cf's CausalVideoDiT compute Wan's function."""
    return {
        "channels": wc.in_channels,
        "patch_size": wc.patch[1],
        "dim": wc.dim,
        "depth": wc.layers,
        "heads": wc.heads,
        "ffn_dim": wc.ffn_dim,
        "text_dim": wc.text_dim,
        "freq_dim": wc.freq_dim,
        "qk_norm": wc.qk_norm is not None,
        "qk_norm_across_heads": True,
        "null_token": False,
        "text_pad_tokens": wc.text_len,
        "fp32_modulation": True,
        "text_encoder": "none",
        "camera": False,
        "positions": "frame",
        "position_scale": 1.0,
        "prediction": "velocity",
        "precondition": "none",
        "rope_theta": 10000.0,
        "video_frames_per_latent": 4,
    }


# ------------------------------------------------------------------------------------------- names
def strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop prefixes that wrappers add (`model.`, `_orig_mod.`, FSDP, DDP, peft) while every key has one."""
    changed = True
    while changed and state:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p) :]: v for k, v in state.items()}
                changed = True
    return state


def naming(keys) -> str:
    """'original' (Wan's own names), 'diffusers', or 'unknown'."""
    keys = list(keys)
    if any(k.startswith(("time_projection.", "head.head.")) or ".self_attn." in k for k in keys):
        return "original"
    if any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys):
        return "diffusers"
    return "unknown"


def original_module_to_diffusers(name: str) -> str:
    """A module path in Wan's own naming -> diffusers' (unknown paths are returned unchanged)."""
    m = _BLOCK.match(name)
    if m:
        rest = m.group(2)
        for a, b in _ORIG_BLOCK.items():
            if rest == a or rest.startswith(a + "."):
                return f"blocks.{m.group(1)}.{b}{rest[len(a) :]}"
        return name
    for a, b in _ORIG_TOP.items():
        if name == a or name.startswith(a + "."):
            return b + name[len(a) :]
    return name


def to_diffusers_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported naming -> diffusers' (wrapper prefixes stripped first)."""
    state = strip_wrappers(state)
    if naming(state) == "original":
        state = {original_module_to_diffusers(k): v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------ tensors
def diffusers_to_cf(state: dict[str, Tensor], wc: WanConfig) -> dict[str, Tensor]:
    """A diffusers-named Wan T2V state dict -> cf CausalVideoDiT's state dict (tensors kept in their
    dtype; unknown keys are passed through so the caller's check names them)."""
    s = dict(state)
    out: dict[str, Tensor] = {}
    p, c = wc.patch[1], wc.out_channels

    def take(name: str) -> Tensor:
        return s.pop(name)

    def linear(src: str, dst: str) -> None:
        for part in ("weight", "bias"):
            if f"{src}.{part}" in s:
                out[f"{dst}.{part}"] = take(f"{src}.{part}")

    if "patch_embedding.weight" in s:
        w = take("patch_embedding.weight")  # [D, C, 1, p, p]
        out["patch_embed.weight"] = w.reshape(w.shape[0], -1)
    if "patch_embedding.bias" in s:
        out["patch_embed.bias"] = take("patch_embedding.bias")
    linear("condition_embedder.text_embedder.linear_1", "text_proj.0")
    linear("condition_embedder.text_embedder.linear_2", "text_proj.2")
    linear("condition_embedder.time_embedder.linear_1", "time_embed.0")
    linear("condition_embedder.time_embedder.linear_2", "time_embed.2")
    linear("condition_embedder.time_proj", "time_proj.1")
    if "scale_shift_table" in s:
        out["head_modulation"] = take("scale_shift_table").reshape(2, -1)
    if "proj_out.weight" in s:  # rows (p, q, c) -> (c, p, q)
        w = take("proj_out.weight")
        out["head.weight"] = w.reshape(p, p, c, -1).permute(2, 0, 1, 3).reshape(c * p * p, -1)
    if "proj_out.bias" in s:
        out["head.bias"] = take("proj_out.bias").reshape(p, p, c).permute(2, 0, 1).reshape(-1)
    for i in range(wc.layers):
        b = f"blocks.{i}"
        for part in ("weight", "bias"):
            qkv = [f"{b}.attn1.to_{x}.{part}" for x in "qkv"]
            if all(k in s for k in qkv):
                out[f"{b}.attn.qkv.{part}"] = torch.cat([take(k) for k in qkv])
            kv = [f"{b}.attn2.to_{x}.{part}" for x in "kv"]
            if all(k in s for k in kv):
                out[f"{b}.cross.kv.{part}"] = torch.cat([take(k) for k in kv])
        linear(f"{b}.attn1.to_out.0", f"{b}.attn.proj")
        linear(f"{b}.attn1.norm_q", f"{b}.attn.norm_q")
        linear(f"{b}.attn1.norm_k", f"{b}.attn.norm_k")
        linear(f"{b}.attn2.to_q", f"{b}.cross.q")
        linear(f"{b}.attn2.to_out.0", f"{b}.cross.proj")
        linear(f"{b}.attn2.norm_q", f"{b}.cross.norm_q")
        linear(f"{b}.attn2.norm_k", f"{b}.cross.norm_k")
        linear(f"{b}.norm2", f"{b}.norm_cross")
        linear(f"{b}.ffn.net.0.proj", f"{b}.ffn.0")
        linear(f"{b}.ffn.net.2", f"{b}.ffn.2")
        if f"{b}.scale_shift_table" in s:
            out[f"{b}.modulation"] = take(f"{b}.scale_shift_table").reshape(6, -1)
    for k in list(s):  # diffusers ignores these on load too (an I2V leftover, and RoPE buffers)
        if k.endswith("norm_added_q.weight") or k.startswith("rope."):
            s.pop(k)
    out.update(s)  # leftovers: reported as unexpected by `check_fits`
    return out


def check_fits(state: dict[str, Tensor], model: torch.nn.Module, source: str, fix: str) -> None:
    """Refuse a converted state that does not fit `model`, naming the file, the first mismatched tensors
    (missing, unexpected, wrong shape) and the fix."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(want[k].shape)})"
        for k in want
        if k in state and state[k].shape != want[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("wrong shape", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise CfError(f"{source} does not fit the Wan transformer cf built: {'; '.join(parts)}. {fix}")
