"""The causal video DiT: shapes from the config, causality, the read interface, conditioning, weights."""

from __future__ import annotations

import pytest
import torch

from cf.config import load_config
from cf.diffusion import build_sampler, denoise, edm_coefficients
from cf.errors import CfError
from cf.model import CacheRead, CausalVideoDiT, Cond, block_causal_mask, build_model, load_weights
from cf.model.rope import axis_dims
from cf.model.text import hash_tokens


@pytest.fixture
def f64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def make(preset="smoke", *overrides, seed=0):
    cfg = load_config(preset, overrides=list(overrides))
    torch.manual_seed(seed)
    model = CausalVideoDiT(cfg.model, cfg.data).double()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return cfg, model


def inputs(cfg, b=2, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    x = torch.randn(b, f, cfg.model.channels, d.height, d.width, generator=g, dtype=torch.float64)
    sigma = torch.rand(b, f, generator=g, dtype=torch.float64)
    cam = torch.rand(b, f, 2, generator=g, dtype=torch.float64) * 50
    return x, sigma, cam


def test_shapes_and_sizes_come_from_the_config(f64):
    for preset, overrides in (("smoke", ()), ("tiny", ()), ("smoke", ("model.patch_size=4", "model.dim=48",
                                                                     "model.heads=4", "model.channels=5"))):
        cfg, model = make(preset, *overrides)
        m, d = cfg.model, cfg.data
        x, sigma, cam = inputs(cfg, b=1, f=3)
        out = model(x, sigma, model.make_cond(["a cat"], camera=cam), time_pos=torch.arange(3))
        n = (d.height // m.patch_size) * (d.width // m.patch_size)
        assert out.pred.shape == x.shape
        assert len(out.kv) == m.depth
        assert out.kv[0][0].shape == (1, 3, n, m.heads, m.dim // m.heads) == out.kv[0][1].shape
        assert out.mean_key.shape == (1, 3, m.depth * (m.dim // m.heads))
        assert model.tokens_per_frame() == n


def test_parameter_count_of_the_tiny_preset():
    cfg = load_config("tiny")
    n = sum(p.numel() for p in CausalVideoDiT(cfg.model, cfg.data).parameters())
    assert 1.0e6 < n < 2.0e6  # DESIGN.md section 7's calibrated scale (~1.3M + the prompt table)


def test_rope_splits_the_head_in_three_even_parts():
    for hd in (16, 32, 64, 128):
        t, h, w = axis_dims(hd)
        assert t + h + w == hd and t % 2 == h % 2 == w % 2 == 0 and h == w > 0


def test_block_causal_mask():
    m = block_causal_mask(6, 2)
    assert m.tolist()[0] == [True, True, False, False, False, False]
    assert m.tolist()[3] == [True, True, True, True, False, False]
    assert m.all(dim=1).tolist() == [False] * 4 + [True] * 2


def test_block_causal_forward_ignores_later_chunks(f64):
    cfg, model = make()
    x, sigma, cam = inputs(cfg, f=6)
    cond = model.make_cond(["a cat", "a dog"], camera=cam)
    mask = block_causal_mask(6, 2)
    a = model(x, sigma, cond, time_pos=torch.arange(6), frame_mask=mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn_like(x2[:, 4:])
    b = model(x2, sigma, cond, time_pos=torch.arange(6), frame_mask=mask)
    assert (a.pred[:, :4] - b.pred[:, :4]).abs().max() < 1e-12
    assert (a.pred[:, 4:] - b.pred[:, 4:]).abs().max() > 1e-3
    full = model(x2, sigma, cond, time_pos=torch.arange(6))  # bidirectional: the past sees the future
    assert (full.pred[:, :4] - b.pred[:, :4]).abs().max() > 1e-3


def test_reading_history_equals_attending_to_it_in_one_call(f64):
    """A query reading the history's un-rotated K/V = the same frames attended in one masked call."""
    for positions in ("world", "frame"):
        cfg, model = make("smoke", f"model.positions={positions}")
        x, sigma, cam = inputs(cfg, f=6)
        cond = model.make_cond(["a cat", "a dog"], camera=cam)
        mask = torch.ones(6, 6, dtype=torch.bool)
        mask[:4, 4:] = False  # history frames do not see the query
        one = model(x, sigma, cond, time_pos=torch.arange(6), frame_mask=mask)
        hist = model(x[:, :4], sigma[:, :4], cond.frames(0, 4), time_pos=torch.arange(4))
        read = CacheRead.from_kv(hist.kv, torch.arange(4), torch.arange(4), torch.tensor([4, 5]), cam[:, :4])
        two = model(x[:, 4:], sigma[:, 4:], cond.frames(4, 6), time_pos=read.query_positions, read=read)
        assert (one.pred[:, 4:] - two.pred).abs().max() < 1e-10
        for (k1, v1), (k2, v2) in zip(one.kv, two.kv):
            assert (k1[:, 4:] - k2).abs().max() < 1e-10 and (v1[:, 4:] - v2).abs().max() < 1e-10
        assert torch.equal(model.rotate_read(model.rotate_read(read)).k[0], model.rotate_read(read).k[0])
        assert read.k[0].requires_grad and not read.detach().k[0].requires_grad


def test_world_positions_make_the_camera_matter_and_frame_positions_do_not(f64):
    cfg, model = make("smoke", "model.camera=false")
    x, sigma, cam = inputs(cfg, b=1, f=2)
    a = model(x, sigma, model.make_cond(["a"], camera=cam), time_pos=torch.arange(2)).pred
    b = model(x, sigma, model.make_cond(["a"], camera=cam + 8), time_pos=torch.arange(2)).pred
    assert (a - b).abs().max() > 1e-3
    cfg, model = make("smoke", "model.camera=false", "model.positions=frame")
    a = model(x, sigma, model.make_cond(["a"], camera=cam), time_pos=torch.arange(2)).pred
    b = model(x, sigma, model.make_cond(["a"], camera=cam + 8), time_pos=torch.arange(2)).pred
    assert (a - b).abs().max() == 0
    with pytest.raises(CfError, match="positions=world needs the per-frame camera"):
        make()[1](x, sigma, Cond(), time_pos=torch.arange(2))


def test_null_condition_drops_text_and_camera(f64):
    cfg, model = make("smoke", "model.positions=frame")
    x, sigma, cam = inputs(cfg, b=1, f=2)
    null = torch.ones(1, dtype=torch.bool)
    a = model(x, sigma, model.make_cond(["a red cat"], camera=cam, null=null), time_pos=torch.arange(2)).pred
    b = model(x, sigma, model.make_cond(["the blue sea"], camera=cam * 3, null=null),
              time_pos=torch.arange(2)).pred
    c = model(x, sigma, model.make_cond(["the blue sea"], camera=cam * 3), time_pos=torch.arange(2)).pred
    assert (a - b).abs().max() < 1e-12
    assert (b - c).abs().max() > 1e-3


def test_hashing_tokenizer_is_stable_and_padded():
    ids = hash_tokens("A red house, a RED house!", 8, 128)
    assert ids[:6] == hash_tokens("a red house a red house", 6, 128) and ids[6:] == [0, 0]
    assert ids[:3] == ids[3:6] and len(set(ids[:3])) == 3 and all(0 < i < 128 for i in ids[:6])
    assert len(hash_tokens(" ".join(["w"] * 50), 8, 128)) == 8


@pytest.mark.slow  # importing sentence-transformers takes ~7 s on 2 cores
def test_minilm_encoder_runs_offline():
    cfg = load_config("smoke", overrides=["model.text_encoder=minilm", "model.text_dim=384"])
    model = CausalVideoDiT(cfg.model, cfg.data)
    feats, mask = model.encode_text(["a red house", "a cat on a very long road by the sea"])
    assert feats.shape == (2, cfg.model.text_tokens, 384) and mask.dtype == torch.bool
    assert mask[0].sum() <= mask[1].sum() and (feats[0] - feats[1]).abs().max() > 0.1
    assert not any(k.startswith("text_encoder") for k in model.state_dict())  # frozen, never checkpointed
    with pytest.raises(CfError, match="model.text_dim=384"):
        CausalVideoDiT(load_config("smoke", overrides=["model.text_encoder=minilm"]).model, cfg.data)


def test_no_text_encoder():
    cfg = load_config("smoke", overrides=["model.text_encoder=none"])
    model = CausalVideoDiT(cfg.model, cfg.data)
    x, sigma, cam = inputs(cfg, b=1, f=2)
    out = model(x.float(), sigma.float(), model.make_cond(["ignored"], camera=cam.float()),
                time_pos=torch.arange(2))
    assert torch.isfinite(out.pred).all()


def test_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    cfg = load_config("smoke")
    a = build_model(cfg)
    b = build_model(cfg)
    state = {f"model.{k}": v for k, v in a.state_dict().items()}
    torch.save({"state_dict": state, "step": 3}, tmp_path / "x.ckpt")
    load_weights(b, tmp_path / "x.ckpt")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "x.safetensors"))
    c = build_model(cfg, weights=tmp_path / "x.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    other = build_model(load_config("smoke", overrides=["model.depth=3"]))
    with pytest.raises(CfError, match="does not fit this model"):
        load_weights(other, tmp_path / "x.ckpt")
    with pytest.raises(CfError, match="does not exist"):
        load_weights(other, tmp_path / "nope.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CfError, match="bad.ckpt"):
        load_weights(other, tmp_path / "bad.ckpt")


def test_state_dict_keys_are_the_networks_own():
    """Checkpoints and safetensors exports written before the preconditioning left the network still load:
    its parameters keep their names (no wrapper prefix, nothing added for EDM)."""
    for precondition in ("none", "edm"):
        cfg = load_config("smoke", overrides=[f"model.precondition={precondition}"])
        state = CausalVideoDiT(cfg.model, cfg.data).state_dict()
        assert {k.split(".")[0] for k in state} == {
            "blocks", "camera_embed", "head", "head_modulation", "null_token", "patch_embed", "text_encoder",
            "text_proj", "time_embed", "time_proj"}
        assert len(state) == 63 and "time_embed.0.weight" in state and "blocks.1.attn.qkv.weight" in state


def test_wrong_frame_size_is_explained():
    cfg = load_config("smoke")
    model = CausalVideoDiT(cfg.model, cfg.data)
    with pytest.raises(CfError, match=r"expects \(3, 16, 16\)"):
        model(torch.zeros(1, 2, 3, 32, 32), torch.zeros(1, 2), Cond(camera=torch.zeros(1, 2, 2)),
              time_pos=torch.arange(2))


def test_pinned_attention_kernel_gives_the_same_result(f64):
    from cf.model import attention_kernels

    cfg, model = make("smoke", "model.attention_backend=math")
    x, sigma, cam = inputs(cfg, f=4)
    cond = model.make_cond(["a cat", "a dog"], camera=cam)
    auto = model(x, sigma, cond, time_pos=torch.arange(4), frame_mask=block_causal_mask(4, 2)).pred
    with attention_kernels(cfg.model):
        math = model(x, sigma, cond, time_pos=torch.arange(4), frame_mask=block_causal_mask(4, 2)).pred
    assert (auto - math).abs().max() < 1e-12


@pytest.mark.parametrize("scale", [8.0, 1.0])
def test_position_scale_sets_the_unit_of_spatial_positions(scale):
    cfg = load_config("tiny", overrides=[f"model.position_scale={scale}"])
    net = CausalVideoDiT(cfg.model, cfg.data)
    cam = torch.tensor([[[12.0, 4.0]]])  # camera at x=12, y=4 pixels
    y, x = net._spatial(cam, 1, torch.float32)
    unit = 8 / scale  # pixels per position unit (patch 8)
    cols = torch.arange(4, dtype=torch.float32).repeat(4)  # 32 px / patch 8 = 4 x 4 tokens
    rows = torch.arange(4, dtype=torch.float32).repeat_interleave(4)
    assert torch.allclose(x[0, 0], (12 + 8 * cols) / unit)
    assert torch.allclose(y[0, 0], (4 + 8 * rows) / unit)


def test_edm_preconditioning_passes_clean_frames_through_and_corrects_noisy_ones(f64):
    """EDM lives in cf.diffusion.denoise, around the network: the network sees c_in * x_t and the timestep
    input sigma * diffusion.num_timesteps, and its raw output is mixed as c_skip * x_t + c_out * F."""
    cfg, model = make("smoke", "model.precondition=edm")
    x, sigma, cam = inputs(cfg)
    cond = model.make_cond(None, camera=cam)
    n = cfg.diffusion.num_timesteps
    clean = denoise(model, x, torch.zeros_like(sigma), cond, num_timesteps=n, time_pos=torch.arange(4)).pred
    assert torch.equal(clean, x)  # c_skip = 1, c_out = 0 at sigma 0
    noisy = denoise(model, x, sigma, cond, num_timesteps=n, time_pos=torch.arange(4)).pred
    _, plain = make("smoke")
    raw = denoise(plain, x, sigma, cond, num_timesteps=n, time_pos=torch.arange(4)).pred  # the same weights
    assert torch.equal(raw, plain(x, sigma * n, cond, time_pos=torch.arange(4)).pred)  # none: F itself
    c_in, c_skip, c_out = (c[..., None, None, None] for c in edm_coefficients(sigma, cfg.model.sigma_data))
    expect = c_skip * x + c_out * plain(x * c_in, sigma * n, cond, time_pos=torch.arange(4)).pred
    assert torch.allclose(noisy, expect) and not torch.allclose(noisy, raw)


@pytest.mark.parametrize("precondition, total, total_abs, values", [
    ("none", 67.0078320615047, 17632.447594762467,
     [0.9623825939160447, 2.720533707333477, -0.9546400738714568]),
    ("edm", -75.42216950131433, 7782.873525154223,
     [0.5241817659703828, 1.5783141224872002, -1.3117072614058702]),
])
def test_predictions_are_the_numbers_of_the_network_that_held_its_own_preconditioning(
        f64, precondition, total, total_abs, values):
    """Pinned in float64 before EDM and the timestep scale moved out of the network (when it computed
    them itself from sigma): moving them changed no number."""
    cfg, model = make("smoke", f"model.precondition={precondition}")
    x, sigma, cam = inputs(cfg)
    pred = denoise(model, x, sigma, model.make_cond(["a cat", "a dog"], camera=cam),
                   num_timesteps=cfg.diffusion.num_timesteps, time_pos=torch.arange(4)).pred
    assert pred.sum().item() == pytest.approx(total, rel=1e-12)
    assert pred.abs().sum().item() == pytest.approx(total_abs, rel=1e-12)
    assert pred[1, 3, 2, 5, :3].tolist() == pytest.approx(values, rel=1e-12)


def test_the_timestep_input_follows_diffusion_num_timesteps(f64):
    """The network's timestep input is sigma * diffusion.num_timesteps: the key drives it, no constant."""
    cfg, model = make("smoke")
    x, sigma, cam = inputs(cfg)
    cond = model.make_cond(["a cat", "a dog"], camera=cam)
    half = denoise(model, x, sigma, cond, num_timesteps=500, time_pos=torch.arange(4)).pred
    assert torch.equal(half, model(x, sigma * 500, cond, time_pos=torch.arange(4)).pred)
    assert not torch.allclose(half, denoise(model, x, sigma, cond, num_timesteps=1000,
                                            time_pos=torch.arange(4)).pred)
    cfg = load_config("smoke", overrides=["diffusion.num_timesteps=500",
                                          "diffusion.student_timesteps=[500,250]"])
    assert {build_sampler(cfg.diffusion, k).num_timesteps for k in ("teacher", "student")} == {500}


def test_edm_needs_an_x0_output():
    from cf.config import ConfigError

    with pytest.raises(ConfigError, match="model.precondition=edm"):
        load_config("smoke", overrides=["model.precondition=edm", "model.prediction=velocity"])


@pytest.mark.parametrize("overrides", [(), ("model.fp32_modulation=true",), ("model.precondition=edm",)])
def test_predicting_only_the_last_frames_equals_the_full_forward_sliced(f64, overrides):
    """out_from=k (what the teacher's loss reads: the target after its history) gives the full forward's
    frames k.. and every frame's keys/values, and the same parameter gradients for a loss on those frames."""
    cfg, model = make("smoke", *overrides)
    x, sigma, cam = inputs(cfg, f=6)
    cond = model.make_cond(["a cat", "a dog"], camera=cam)
    kw = dict(num_timesteps=cfg.diffusion.num_timesteps, time_pos=torch.arange(6),
              frame_mask=block_causal_mask(6, 2))
    full = denoise(model, x, sigma, cond, **kw)
    part = denoise(model, x, sigma, cond, out_from=4, **kw)
    assert part.pred.shape == full.pred[:, 4:].shape
    assert (part.pred - full.pred[:, 4:]).abs().max() < 1e-12
    for (k1, v1), (k2, v2) in zip(full.kv, part.kv):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    grads = []
    for out in (full.pred[:, 4:], part.pred):
        model.zero_grad()
        out.pow(2).sum().backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() < 1e-10
    with pytest.raises(CfError, match="out_from=6"):
        model(x, sigma, cond, time_pos=torch.arange(6), out_from=6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_rotates_each_pair_by_its_angle(dtype):
    """apply_rope on a strided view (q out of a fused qkv, as attention passes it) and on a contiguous
    tensor = the rotation written out pair by pair, in the angle dtype, cast back to the input's (within one
    rounding of the input's dtype: the complex product may fuse a multiply-add)."""
    from cf.model.rope import apply_rope

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3, 4, 3, 2, 12, generator=g, dtype=torch.float64).to(dtype)
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ang = torch.rand(1, 3, 4, 1, 6, generator=g, dtype=angle_dtype) * 100
    for x in (qkv.unbind(3)[1], qkv[:, :, :, 1].contiguous()):
        a, b = x.to(angle_dtype)[..., 0::2], x.to(angle_dtype)[..., 1::2]
        want = torch.empty(x.shape, dtype=angle_dtype)
        want[..., 0::2] = a * ang.cos() - b * ang.sin()
        want[..., 1::2] = a * ang.sin() + b * ang.cos()
        got = apply_rope(x, ang.cos(), ang.sin())
        assert got.dtype == dtype
        eps = torch.finfo(dtype).eps
        assert torch.allclose(got.to(angle_dtype), want, atol=8 * eps, rtol=eps)
