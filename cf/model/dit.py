"""CausalVideoDiT: a chunked causal video diffusion transformer in the shape of Wan2.1.

patchify -> (+ world-position embedding) -> blocks [per-frame adaLN from the noise level (and
camera), 3D-RoPE self-attention over (history read ; this call's frames), cross-attention to
the prompt, MLP] -> modulated head -> unpatchify. Every size comes from the config.

The network knows nothing about the noise process or caches: it takes inputs already scaled for
it (frames and a timestep input, from `cf.diffusion.denoise`, which also mixes its raw output into a
prediction), a read of history and positions, and returns its output plus the un-rotated keys/values
of the frames it processed, so the caller decides (explicitly, after the forward) what to write to a
cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from cf.errors import CfError
from cf.model.block import Block
from cf.model.cond import Cond
from cf.model.embed import patchify, sinusoid, sinusoid_2d, unpatchify
from cf.model.read import CacheRead
from cf.model.rope import Rope3D, angle_dtype, apply_rope
from cf.model.text import build_text_encoder


@dataclass
class ModelOutput:
    pred: Tensor  # [B, F, C, H, W]: the network's output (cf.diffusion.denoise makes it x0 or velocity)
    kv: list[tuple[Tensor, Tensor]]  # per layer, un-rotated (k, v) of this call's frames [B, F, N, H, Dh]

    @property
    def mean_key(self) -> Tensor:
        """[B, F, depth * Dh]: per layer mean of k over tokens and heads, concatenated (what a policy that
        promotes by key similarity compares; computed only when asked)."""
        return torch.cat([k.mean(dim=(2, 3)) for k, _ in self.kv], dim=-1)


def block_causal_mask(n_frames: int, chunk: int, device: torch.device | str | None = None) -> Tensor:
    """[F, F] bool, True where frame i may attend frame j: j's chunk is not after i's."""
    c = torch.arange(n_frames, device=device) // chunk
    return c[None, :] <= c[:, None]


class CausalVideoDiT(nn.Module):
    def __init__(self, model_cfg, data_cfg):
        super().__init__()
        m = model_cfg
        self.cfg = m
        self.channels, self.patch = m.channels, m.patch_size
        self.height, self.width = data_cfg.height, data_cfg.width
        self.rows, self.cols = self.height // self.patch, self.width // self.patch
        self.dim, self.heads, self.head_dim = m.dim, m.heads, m.dim // m.heads
        self.prediction, self.positions = m.prediction, m.positions
        self.position_scale = float(m.position_scale)
        patch_dim = m.channels * m.patch_size**2

        self.patch_embed = nn.Linear(patch_dim, m.dim)
        self.text_encoder = build_text_encoder(m)
        self.text_proj = nn.Sequential(nn.Linear(m.text_dim, m.dim), nn.GELU(approximate="tanh"),
                                       nn.Linear(m.dim, m.dim))
        # always-present context token: guidance's null condition (and a prompt-less model)
        # attends to it instead of to nothing. Without it (model.null_token=false, Wan) the context is the
        # text alone and the unconditional branch is a text of its own (Cond.null_text: a negative prompt)
        self.null_token = nn.Parameter(torch.randn(1, m.dim) * 0.02) if m.null_token else None
        self.text_pad = int(m.text_pad_tokens)
        self.freq_dim = m.freq_dim or m.dim  # width of the timestep sinusoid
        self.fp32 = bool(m.fp32_modulation)
        self.time_embed = nn.Sequential(nn.Linear(self.freq_dim, m.dim), nn.SiLU(), nn.Linear(m.dim, m.dim))
        self.camera_embed = (
            nn.Sequential(nn.Linear(m.dim, m.dim), nn.SiLU(), nn.Linear(m.dim, m.dim)) if m.camera else None
        )
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(m.dim, 6 * m.dim))
        self.blocks = nn.ModuleList(Block(m.dim, m.heads, m.ffn_dim, m.qk_norm, m.qk_norm_across_heads,
                                          self.fp32) for _ in range(m.depth))
        self.head_norm = nn.LayerNorm(m.dim, eps=1e-6, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(2, m.dim) * m.dim**-0.5)
        self.head = nn.Linear(m.dim, patch_dim)
        self.rope = Rope3D(self.head_dim, m.rope_theta)
        self._init_weights()

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        # a small head: early predictions stay near 0 (the data mean) without being constant
        nn.init.normal_(self.head.weight, std=0.02)

    # ---------------------------------------------------------------- conditioning
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (features [B, L, text_dim], mask [B, L] bool) on the model's device."""
        return self.text_encoder(list(prompts))

    def make_cond(self, prompts: list[str] | None, camera: Tensor | None = None,
                  null: Tensor | None = None) -> Cond:
        """A Cond for `prompts` (None: no text), camera [B, F, 2] and guidance mask null [B]."""
        text, mask = self.encode_text(prompts) if prompts is not None else (None, None)
        return Cond(text=text, text_mask=mask, camera=camera, null=null)

    def _context(self, cond: Cond, b: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Cross-attention context [B, 1 + L, D] and mask [B, 1 + L]: the null token, then the text.

        Without a null token (Wan): the text alone; with model.text_pad_tokens=N its features are
        zero-padded to N tokens and all attended (mask None), as Wan pads UMT5's features to 512."""
        if self.null_token is None:
            return self._text_context(cond, b, device)
        null_tok = self.null_token.expand(b, 1, self.dim)
        ones = torch.ones(b, 1, dtype=torch.bool, device=device)
        if cond.text is None:
            return null_tok, ones
        text = self.text_proj(cond.text.to(null_tok.dtype))
        mask = cond.text_mask if cond.text_mask is not None else torch.ones(text.shape[:2], dtype=torch.bool,
                                                                           device=device)
        if cond.null is not None:
            mask = mask & ~cond.null[:, None]
        return torch.cat([null_tok, text], dim=1), torch.cat([ones, mask], dim=1)

    def _text_context(self, cond: Cond, b: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The context of a model without a null token: the text (its null rows are whatever text the
        caller put there, e.g. a negative prompt through Cond.null_text: nothing is masked here)."""
        dtype = self.text_proj[0].weight.dtype
        text = cond.text
        if text is None:
            if not self.text_pad:
                raise CfError("a model with model.null_token=false and model.text_pad_tokens=0 needs text "
                              "features in cond.text (it has no null token to attend to)")
            text = torch.zeros(b, 0, self.text_proj[0].in_features, device=device)
        if self.text_pad:
            if text.shape[1] > self.text_pad:
                raise CfError(f"text features have {text.shape[1]} tokens, more than "
                              f"model.text_pad_tokens={self.text_pad}; truncate the prompt's tokens")
            text = torch.nn.functional.pad(text, (0, 0, 0, self.text_pad - text.shape[1]))
            return self.text_proj(text.to(dtype)), None
        mask = cond.text_mask
        if mask is not None and not bool(mask.any(dim=1).all()):
            raise CfError("a text row with no attended token (cond.text_mask all False) in a model "
                          "without a null token; give every row at least one token")
        return self.text_proj(text.to(dtype)), mask

    # ---------------------------------------------------------------- positions
    def _spatial(self, camera: Tensor | None, f: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(y, x) of every token in units of patch / model.position_scale, in the angle dtype (never
        bf16: positions reach the thousands): [B, F, N] from the cameras (world) or [1, F, N] (frame)."""
        pd = angle_dtype(dtype)
        s = self.position_scale
        grid = torch.arange(self.rows * self.cols, device=self.head.weight.device)
        gy, gx = (grid // self.cols).to(pd) * s, (grid % self.cols).to(pd) * s
        if self.positions == "frame":
            return gy.expand(1, f, -1), gx.expand(1, f, -1)
        if camera is None:
            raise CfError("model.positions=world needs the per-frame camera (cond.camera [B, F, 2]); "
                          "pass it, or set model.positions=frame")
        cam = camera.to(pd) * (s / self.patch)  # [B, F, 2] (x, y)
        return cam[..., 1:2] + gy, cam[..., 0:1] + gx

    def rotate_read(self, read: CacheRead) -> CacheRead:
        """Apply each read frame's rotary position to its cached keys once (reused over sampler steps)."""
        if read.rotated:
            return read
        y, x = self._spatial(read.cameras, read.n_frames, read.k[0].dtype)
        cos, sin = self.rope(read.positions, y, x, read.k[0].dtype)
        return replace(read, k=[apply_rope(k, cos, sin) for k in read.k], rotated=True)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Cond,
        *,
        time_pos: Tensor,
        read: CacheRead | None = None,
        frame_mask: Tensor | None = None,
        out_from: int = 0,
    ) -> ModelOutput:
        """x [B, F, C, H, W] input frames and t [B, F] (or [B] / scalar) their timestep input, both
        already scaled for the network (`cf.diffusion.denoise`: t = sigma * diffusion.num_timesteps);
        cond for these F frames (camera [B, F, 2]); time_pos [F] long RoPE time indices;
        read: history every query frame attends to; frame_mask [F, F] bool among this call's
        frames (None: all to all, as within a chunk or the teacher's target window);
        out_from: predict only frames out_from.. (pred [B, F - out_from, ...]); the earlier frames are
        still run through every layer for the keys and values the later ones read (kv covers all F
        frames), but the last block skips their queries, cross-attention and MLP, which nothing reads.
        """
        b, f = x.shape[:2]
        if not 0 <= out_from < f:
            raise CfError(f"out_from={out_from} must name one of the call's {f} frames (0 <= out_from < {f})")
        expected = (self.channels, self.height, self.width)
        if tuple(x.shape[2:]) != expected:
            raise CfError(f"model input has frames of shape {tuple(x.shape[2:])}; this model expects "
                          f"{expected} (model.channels, data.height, data.width)")
        t = torch.as_tensor(t, device=x.device, dtype=angle_dtype(x.dtype))
        t = t.expand(b, f) if t.dim() == 0 else t.reshape(b, -1).expand(b, f)
        tokens = self.patch_embed(patchify(x, self.patch))  # [B, F, N, D]
        ys, xs = self._spatial(cond.camera, f, x.dtype)
        if self.positions == "world":
            tokens = tokens + sinusoid_2d(ys, xs, self.dim).to(tokens.dtype)
        cos, sin = self.rope(time_pos, ys, xs, tokens.dtype)

        e = self._time_embedding(t, tokens.dtype)  # [B, F, D]
        if self.camera_embed is not None and cond.camera is not None:
            cam = cond.camera.to(angle_dtype(x.dtype)) / self.patch
            c = self.camera_embed(sinusoid_2d(cam[..., 1], cam[..., 0], self.dim).to(tokens.dtype))
            if cond.null is not None:
                c = c * (~cond.null).to(c.dtype)[:, None, None]
            e = e + c
        with self._hp_region(x):
            e6 = self.time_proj(e).unflatten(-1, (6, self.dim))  # [B, F, 6, D]
        ctx, ctx_mask = self._context(cond, b, x.device)

        if read is not None and read.n_frames:
            read = self.rotate_read(read)
        else:
            read = None
        mask = self._token_mask(frame_mask, read.n_frames if read else 0, tokens.shape[2], x.device)
        kvs = []
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            read_kv = (read.k[i], read.v[i]) if read is not None else None
            tokens, kv = blk(tokens, e6, cos, sin, ctx, ctx_mask, read_kv, mask,
                             keep_from=out_from if i == last else 0)
            kvs.append(kv)
        e = e[:, out_from:]

        if self.fp32:  # Wan: the head's modulation and norm in fp32, the projection in the compute dtype
            hp = torch.promote_types(tokens.dtype, torch.float32)
            with self._hp_region(x):
                shift, scale = (self.head_modulation.to(hp) + e.to(hp).unsqueeze(2)).unsqueeze(2).unbind(3)
                h = (self.head_norm(tokens.to(hp)) * (1 + scale) + shift).to(tokens.dtype)
            out = self.head(h)
        else:
            shift, scale = (self.head_modulation + e.unsqueeze(2)).unsqueeze(2).unbind(3)  # [B, F, 1, D] each
            out = self.head(self.head_norm(tokens) * (1 + scale) + shift)
        return ModelOutput(pred=unpatchify(out, self.patch, self.channels, self.height, self.width), kv=kvs)

    def _time_embedding(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """Timestep input [B, F] -> embedding [B, F, D]: a sinusoid of model.freq_dim channels, an MLP.
        With model.fp32_modulation (Wan) in fp32 (fp64 for a float64 model), whatever the compute dtype."""
        if not self.fp32:
            return self.time_embed(sinusoid(t, self.freq_dim).to(dtype))
        hp = torch.promote_types(dtype, torch.float32)
        with self._hp_region(t):
            return self.time_embed(sinusoid(t, self.freq_dim).to(hp))

    def _hp_region(self, x: Tensor):
        """No autocast inside (model.fp32_modulation): what Wan keeps in fp32 stays there."""
        import contextlib

        return torch.autocast(x.device.type, enabled=False) if self.fp32 else contextlib.nullcontext()

    def keep_fp32(self) -> CausalVideoDiT:
        """With model.fp32_modulation: the time embedding, the modulations and the affine norms back to
        fp32 after a conversion to a half type (Wan's `_keep_in_fp32_modules`); a no-op otherwise."""
        if not self.fp32:
            return self
        half = (torch.bfloat16, torch.float16)
        params = [*self.time_embed.parameters(), *self.time_proj.parameters(), self.head_modulation]
        for b in self.blocks:
            params += [*b.norm_cross.parameters(), b.modulation]
        with torch.no_grad():
            for p in params:
                if p.dtype in half:
                    p.data = p.data.float()
        return self

    @staticmethod
    def _token_mask(frame_mask: Tensor | None, m: int, n: int, device) -> Tensor | None:
        """[F, F] frame mask -> [F*N, (M+F)*N] token mask; the read is visible to every query."""
        if frame_mask is None:
            return None
        tok = frame_mask.to(device).repeat_interleave(n, 0).repeat_interleave(n, 1)
        if m:
            tok = torch.cat([torch.ones(tok.shape[0], m * n, dtype=torch.bool, device=device), tok], dim=1)
        return tok

    def tokens_per_frame(self) -> int:
        return self.rows * self.cols
