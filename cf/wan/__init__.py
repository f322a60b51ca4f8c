"""Real Wan2.1 models (Self-Forcing, LongLive, Context Forcing and Wan's own checkpoints) in cf's one rollout.

    from cf.wan import read_wan
    weights = read_wan("Wan2.1-T2V-1.3B-Diffusers", ckpt="self_forcing_dmd.pt")  # config from the files
    model = weights.build(height=60, width=104)                                   # a CausalVideoDiT

`convert` holds the naming and the tensor changes (original Wan / diffusers -> cf), `read` the readers of
every layout (diffusers folder, Wan's release, generator dicts, peft LoRA), `text` UMT5, `vae` the Wan VAE
decoded chunk by chunk, `generate` the `cf generate --model wan` run. UMT5 and the VAE need the optional
`wan` extra (transformers, diffusers): `pip install -e .[wan]`; they are imported only on that path.
See docs/wan.md.
"""

from cf.wan.convert import WanConfig, diffusers_to_cf, model_overrides
from cf.wan.read import WanWeights, merge_lora, read_wan

__all__ = ["WanConfig", "WanWeights", "diffusers_to_cf", "merge_lora", "model_overrides", "read_wan"]
