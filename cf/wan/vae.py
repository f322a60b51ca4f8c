"""The Wan VAE (diffusers `AutoencoderKLWan`) decoding latents chunk by chunk as the rollout makes them.

The decoder is causal in time: each latent frame is decoded with a cache of the previous frames'
activations (what `AutoencoderKLWan.decode` does over a whole video in one call). `StreamDecoder` keeps
that cache across calls, so decoding chunk after chunk gives the very frames of one decode of the whole
video while only one chunk's pixels exist at a time. Latents are in the transformer's (normalised) space;
they are de-normalised with the VAE config's latents_mean / latents_std first. Frames come out in [-1, 1]:
1 for the first latent frame, then `temporal_compression` per latent frame (Wan: 4).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from cf.errors import CfError


def load_vae(weights: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The Wan VAE from a diffusers folder (`vae/` of a pipeline, or the folder itself) or Wan's own
    `Wan2.1_VAE.pth` (in the folder, or the file itself; cf.wan.pth)."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:
        raise CfError(f"the Wan VAE needs diffusers ({e}); pip install -e .[wan]") from None
    from cf.wan.pth import VAE_FILE, load_vae_pth

    root = Path(weights)
    d = root / "vae" if (root / "vae").is_dir() else root
    if (d / "config.json").is_file():
        vae = AutoencoderKLWan.from_pretrained(str(d), local_files_only=True, torch_dtype=dtype)
        return vae.to(device).eval()
    pth = root if root.suffix == ".pth" and root.is_file() else root / VAE_FILE
    if pth.is_file():
        return load_vae_pth(pth, device=device, dtype=dtype)
    raise CfError(
        f"{root} holds no Wan VAE: --weights must hold vae/ (config.json + diffusion_pytorch_model"
        f".safetensors, a diffusers Wan pipeline) or {VAE_FILE} (Wan's own release); see docs/wan.md"
    )


@torch.no_grad()
def encode_still(vae, frame: Tensor, n_latents: int) -> Tensor:
    """A picture held still, encoded into `n_latents` latent frames in the transformer's (normalised) space.

    frame: float [3, H, W] in [-1, 1] at the VAE's pixel size. The still clip has 1 + t * (n_latents - 1)
    frames (t the temporal compression, Wan: 4); the causal encoder makes its first latent frame from the
    picture alone, exactly as Wan's image-to-video pipelines encode their conditioning image, and each
    later one from 4 more copies. Returns [1, n_latents, C, H / s, W / s] (the distribution's mode)."""
    if n_latents < 1:
        raise CfError(f"a picture needs at least one latent frame, got n_latents={n_latents}")
    p = next(vae.parameters())
    temporal = 2 ** sum(vae.config.temperal_downsample)
    clip = frame.to(p.device, p.dtype)[None, :, None].expand(1, -1, 1 + temporal * (n_latents - 1), -1, -1)
    z = vae.encode(clip.contiguous()).latent_dist.mode()  # [1, C, F, h, w]
    mean = torch.tensor(vae.config.latents_mean, device=p.device, dtype=p.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=p.device, dtype=p.dtype).view(1, -1, 1, 1, 1)
    return ((z - mean) / std).permute(0, 2, 1, 3, 4)


class StreamDecoder:
    """decode(latents [B, F, C, h, w]) -> frames [B, T, 3, H, W] in [-1, 1], continuing the video."""

    def __init__(self, vae):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        if getattr(vae.config, "patch_size", None):
            raise CfError("a patchified Wan VAE (Wan2.2's) is not supported; use Wan2.1's VAE")
        self.vae = vae
        self.n_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        c = vae.config
        p = next(vae.parameters())
        self.mean = torch.tensor(c.latents_mean, device=p.device, dtype=p.dtype).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(c.latents_std, device=p.device, dtype=p.dtype).view(1, -1, 1, 1, 1)
        self.temporal = 2 ** sum(c.temperal_downsample)
        self.spatial = 2 ** (len(c.dim_mult) - 1)
        self.reset()

    def reset(self) -> None:
        self.cache: list = [None] * self.n_convs
        self.n = 0  # latent frames decoded so far

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        p = next(self.vae.parameters())
        z = latents.to(p.device, p.dtype).permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
        z = self.vae.post_quant_conv(z * self.std + self.mean)
        outs = []
        for i in range(z.shape[2]):
            idx = [0]
            outs.append(
                self.vae.decoder(
                    z[:, :, i : i + 1], feat_cache=self.cache, feat_idx=idx, first_chunk=self.n == 0
                )
            )
            self.n += 1
        return outs[0].new_zeros(0) if not outs else torch.cat(outs, 2).clamp(-1, 1).permute(0, 2, 1, 3, 4)

    def frames_for(self, n_latents: int) -> int:
        """Video frames of the first n_latents latent frames."""
        return 0 if n_latents <= 0 else 1 + (n_latents - 1) * self.temporal
