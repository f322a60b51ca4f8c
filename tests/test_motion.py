"""Dynamic degree on the world's own videos (still camera, slow and fast pans), the built-in flow on known
translations, and RAFT as an option: loading local weights, running, naming itself, failing clearly."""

import pytest
import torch
import torch.nn.functional as F

from cf.config import load_config
from cf.data.world import World
from cf.errors import CfError
from cf.metrics.motion import (
    FLOW_METHOD,
    FLOWS,
    MIN_THRESHOLD_PX,
    RAFT_MIN_SIDE,
    VBENCH_THRESHOLD,
    DynamicDegree,
    RaftFlow,
    _grey,
    flow_top_magnitudes,
    get_flow,
    lucas_kanade,
    motion_threshold,
)
from cf.registry import UnknownNameError

FPS = 8.0
FRAMES = 24
SEEDS = (0, 1, 2)
# camera speeds in pixels per frame: 0.01 holds the pingpong camera still for its first 50 frames
# (x = x0 + rint(0.01 t)) while the subjects keep moving (their speed is relative to max(speed, 1))
SPEEDS = {"still": 0.01, "slow": 1.0, "fast": 4.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """32x32 frames are per-op overhead, not arithmetic: a second thread only adds synchronisation, which
    costs ~25x when other jobs hold the cores (measured: LK over 3 clips, 0.13 s on 1 thread, 3.2 s on 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def world_clips(speed: float, subjects: int = 2, frames: int = FRAMES):
    """The world at tiny's 32x32 with the pingpong camera at `speed` px per frame, one clip per seed."""
    cfg = load_config("tiny", overrides=["data.camera_path=pingpong", f"data.camera_speed={speed}",
                                         f"data.n_subjects={subjects}"])
    return [World(cfg.data, seed).render(frames) for seed in SEEDS]


@pytest.fixture(scope="module")
def world_scores():
    """{case: (DynamicDegree.compute() over the SEEDS videos, the clips)} at tiny's 32x32, 8 fps."""
    out = {}
    for case, speed in SPEEDS.items():
        clips = world_clips(speed, subjects=4 if case == "still" else 2)  # more subjects: some are in view
        metric = DynamicDegree()
        for clip in clips:
            metric.update(clip.video[None], fps=FPS)
        out[case] = ({k: float(v) for k, v in metric.compute().items()}, clips)
    return out


def test_the_world_clips_are_what_they_claim(world_scores):
    still, slow, fast = (world_scores[c][1] for c in ("still", "slow", "fast"))
    assert all(bool((c.camera == c.camera[0]).all()) for c in still)
    steps = [(c.camera[1:, 0] - c.camera[:-1, 0]).abs() for c in slow + fast]
    assert all(float(s.median()) == 1.0 for s in steps[:len(slow)])
    assert all(float(s.median()) == 4.0 for s in steps[len(slow):])
    assert any(not bool(c.background.all()) for c in still)  # subjects are in view: not a frozen picture


def test_still_slow_fast_score_apart_in_that_order(world_scores):
    s, m, f = (world_scores[c][0] for c in ("still", "slow", "fast"))
    # the continuous score separates all three, each at least twice the one before
    assert 0.0 <= s["flow_magnitude_rel"] and 2 * s["flow_magnitude_rel"] < m["flow_magnitude_rel"]
    assert 2 * m["flow_magnitude_rel"] < f["flow_magnitude_rel"]
    for r in (s, m, f):  # relative = pixels / shorter side at 8 fps
        assert r["flow_magnitude_rel"] == pytest.approx(r["flow_magnitude"] / 32)
    # the top 5 % of a pan's flow moves at least at the pan's speed; the built-in flow overreads little
    assert 0.95 * SPEEDS["slow"] < m["flow_magnitude"] < 1.5 * SPEEDS["slow"]
    assert 0.95 * SPEEDS["fast"] < f["flow_magnitude"] < 1.5 * SPEEDS["fast"]
    # the decision: the still camera never moves, the fast pan always does, the slow pan in between
    assert s["dynamic_degree"] == 0.0 and f["dynamic_degree"] == 1.0
    assert s["dynamic_degree"] <= m["dynamic_degree"] < f["dynamic_degree"]
    assert s["moving_fraction"] <= m["moving_fraction"] and m["moving_fraction"] + 0.5 < f["moving_fraction"]
    assert f["moving_fraction"] > 0.9


def test_the_floor_is_what_separates_a_slow_pan_at_32_px(world_scores):
    thr = motion_threshold(32, 32, FPS)
    assert thr == MIN_THRESHOLD_PX > VBENCH_THRESHOLD * 32
    assert motion_threshold(256, 256, FPS) == pytest.approx(6.0)  # VBench's own threshold, untouched
    assert motion_threshold(256, 256, 4.0) == pytest.approx(12.0)  # pairs twice as far apart in time
    slow = torch.cat([flow_top_magnitudes(c.video, 1) for c in world_scores["slow"][1]])
    fast = torch.cat([flow_top_magnitudes(c.video, 1) for c in world_scores["fast"][1]])
    assert float((slow > VBENCH_THRESHOLD * 32).double().mean()) > 0.9  # VBench's rule: the slow pan "moves"
    assert float((slow > thr).double().mean()) < 0.25 < float((fast > thr).double().mean())


def test_a_still_frame_with_noise_is_not_dynamic():
    frame = world_clips(SPEEDS["fast"])[0].video[:1]
    noisy = (frame + 0.03 * torch.randn(FRAMES, *frame.shape[1:], generator=torch.Generator().manual_seed(0)))
    r = DynamicDegree()(noisy.clamp(-1, 1)[None], fps=FPS)
    assert float(r["dynamic_degree"]) == 0.0 and float(r["moving_fraction"]) == 0.0
    assert 0.0 < float(r["flow_magnitude"]) < MIN_THRESHOLD_PX  # noise reads as some flow, below the floor
    exact = DynamicDegree()(frame.expand(FRAMES, -1, -1, -1)[None], fps=FPS)
    assert float(exact["flow_magnitude"]) < 1e-3


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_builtin_flow_reads_a_whole_pixel_pan_of_the_world(k):
    cfg = load_config("tiny", overrides=["data.n_subjects=0"])
    pano = torch.from_numpy(World(cfg.data, 0).panorama).permute(2, 0, 1).float() / 127.5 - 1  # [3, 32, W]
    video = torch.stack([pano[:, :, k * t: k * t + 32] for t in range(6)])  # content moves k px left a frame
    flow = lucas_kanade(_grey(video[:-1]), _grey(video[1:]))  # [5, 2, 32, 32]
    assert float(flow[:, 0].median()) == pytest.approx(-k, abs=0.05)
    assert float(flow[:, 1].abs().median()) < 0.05
    top = flow_top_magnitudes(video, 1)  # the top 5 % overreads a little at the frame's edges, never under
    assert k - 0.05 < float(top.mean()) < k + 0.5


def test_builtin_flow_scales_back_from_its_working_size():
    """At 192 px the flow runs at 128 px; magnitudes must come back in the frame's pixels."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 192, 260, generator=g)
    for _ in range(3):  # a smooth texture, so the flow is well posed
        x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    tex = ((x - x.min()) / (x.max() - x.min()) * 2 - 1)[0]
    for k in (3, 6):
        video = torch.stack([tex[:, :, k * t: k * t + 192] for t in range(4)])
        assert float(flow_top_magnitudes(video, 1).mean()) == pytest.approx(k, rel=0.05)


# --- RAFT -------------------------------------------------------------------------------------------------

def _random_raft_file(tmp_path, name: str, drop: int = 0):
    from safetensors.torch import save_file
    from torchvision.models.optical_flow import raft_small

    sd = raft_small(weights=None).state_dict()
    sd = dict(list(sd.items())[drop:])
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("name", ["raft.safetensors", "my_raft.pth"])
def test_raft_with_local_random_weights_runs_and_names_itself(tmp_path, name):
    path = _random_raft_file(tmp_path, name)
    metric = DynamicDegree(flow="raft_small", flow_weights=path)
    assert "RAFT-small" in metric.flow_method and name in metric.flow_method
    assert metric.flow_method != FLOW_METHOD and metric.method.startswith(metric.flow_method)
    assert DynamicDegree().flow_method == FLOW_METHOD
    video = world_clips(SPEEDS["fast"], frames=4)[0].video  # 32x32: resized to 128x128 inside
    r = metric(video[None], fps=FPS)
    assert set(r) == {"dynamic_degree", "moving_fraction", "flow_magnitude", "flow_magnitude_rel"}
    assert all(torch.isfinite(v) for v in r.values()) and float(r["flow_magnitude"]) >= 0


def test_raft_finds_torchvisions_file_in_a_folder(tmp_path):
    _random_raft_file(tmp_path, "raft_small_C_T_V2-01064c6d.pth")
    assert "raft_small_C_T_V2-01064c6d.pth" in get_flow("raft_small", tmp_path).name


class ConstantFlow(torch.nn.Module):
    """Stands in for RAFT: flow (u, v) everywhere at whatever size it is given; records the sizes."""

    def __init__(self, u: float, v: float):
        super().__init__()
        self.uv, self.sizes = (u, v), []

    def forward(self, a, b, num_flow_updates):
        self.sizes.append(tuple(a.shape[-2:]))
        return [torch.tensor(self.uv).view(1, 2, 1, 1).expand(a.shape[0], 2, *a.shape[-2:])]


def test_raft_input_is_resized_to_its_needs_and_the_flow_scaled_back():
    stub = ConstantFlow(8.0, 6.0)
    flow = RaftFlow("raft_small", stub, "stub")
    frames = torch.zeros(7, 3, 30, 50)  # 6 pairs: batches of RAFT_BATCH and a remainder
    mag = flow.magnitudes(frames)
    assert mag.shape[0] == 6
    (hh, ww), = set(stub.sizes)
    assert hh % 8 == 0 and ww % 8 == 0 and min(hh, ww) >= RAFT_MIN_SIDE and (hh - 8) < RAFT_MIN_SIDE
    expected = ((8.0 * 50 / ww) ** 2 + (6.0 * 30 / hh) ** 2) ** 0.5  # working pixels -> the frame's pixels
    assert torch.allclose(mag, torch.full_like(mag, expected))


def test_missing_or_wrong_raft_weights_say_what_is_needed(tmp_path, monkeypatch):
    from torchvision.models.optical_flow import Raft_Small_Weights

    needed = Raft_Small_Weights.C_T_V2.url.rsplit("/", 1)[-1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    for weights, why in ((tmp_path / "nowhere" / "raft.pth", "does not exist"), (None, "never downloads")):
        with pytest.raises(CfError, match="flow_weights=PATH") as e:
            DynamicDegree(flow="raft_small", flow_weights=weights)
        assert needed in str(e.value) and why in str(e.value)
    broken = _random_raft_file(tmp_path, "broken.pth", drop=1)
    with pytest.raises(CfError, match="does not hold torchvision raft_small weights"):
        DynamicDegree(flow="raft_small", flow_weights=broken)
    with pytest.raises(CfError, match="takes no weights"):
        DynamicDegree(flow="lk", flow_weights=broken)
    with pytest.raises(UnknownNameError, match="raft_small"):
        DynamicDegree(flow="raft")
    assert set(FLOWS.names()) == {"lk", "raft_small", "raft_large"}
