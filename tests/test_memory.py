"""Memory policies and the KV cache, driven with cheap fake keys (no model) so 1,000 chunks stay fast."""

from __future__ import annotations

import pytest
import torch

from cf.config import ConfigError, load_config
from cf.errors import CfError
from cf.memory import POLICIES, KVCache, build_policy
from cf.registry import UnknownNameError

C = 2  # frames per chunk in these tests


def mem(**kw):
    cfg = load_config("smoke").memory
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def fake_kv(first: int, m: int, batch: int = 1):
    """One layer whose every key/value entry is the frame's absolute index: slots can be checked."""
    t = torch.arange(first, first + m, dtype=torch.float32).view(1, m, 1, 1, 1).expand(batch, m, 1, 1, 2)
    return [(t.clone(), -t.clone())]


def drive(cache: KVCache, n_frames: int, keys: torch.Tensor | None = None, chunk: int = C):
    """Write n_frames in chunks; keys [n_frames, Dk] are the frames' mean keys."""
    for f0 in range(0, n_frames, chunk):
        mk = None if keys is None else keys[None, f0:f0 + chunk]
        cam = torch.arange(f0, f0 + chunk, dtype=torch.float32).view(1, chunk, 1).expand(1, chunk, 2)
        cache.write(fake_kv(f0, chunk), cam, mk)


def held(cache: KVCache) -> dict[int, int]:
    r = cache.read()
    return dict(zip(r.times.tolist(), r.positions.tolist()))


def test_unknown_policy_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        POLICIES.get("slowfsat")
    for name in ("full", "sliding", "sink", "slowfast"):
        assert name in str(e.value)
    assert "did you mean 'slowfast'" in str(e.value)
    with pytest.raises(UnknownNameError, match="valid memory policy names: full, sink, sliding, slowfast"):
        load_config("smoke", overrides=["memory.policy=window"])


def test_window_smaller_than_chunk_is_refused():
    with pytest.raises(CfError, match=r"memory.window_frames=1 .* model.frames_per_chunk=2"):
        build_policy(mem(policy="sliding", window_frames=1), 2)


def test_config_rejects_negative_sizes():
    with pytest.raises(ConfigError, match="memory.slow_frames"):
        load_config("smoke", overrides=["memory.slow_frames=-1"])


@pytest.mark.parametrize("policy,extra", [
    ("sliding", {}), ("sink", {}), ("slowfast", {"promotion": "similarity"}),
    ("slowfast", {"promotion": "uniform", "promote_every": 1}),
])
def test_bounded_policy_over_1000_chunks(policy, extra):
    """Positions stay in [0, N_s + N_c + N_l), the cache never holds more than its budget, the bytes
    it holds are constant once full, and every slot still holds the frame it claims to."""
    cfg = mem(policy=policy, sink_frames=2, slow_frames=3, window_frames=6, promote_after=4, **extra)
    pol = build_policy(cfg, C)
    cache = KVCache(pol)
    bound = pol.position_bound
    assert bound == {"sliding": 6, "sink": 8, "slowfast": 11}[policy]
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for step in range(1000):
        f0 = step * C
        keys = torch.randn(1, C, 8, generator=gen)
        cache.write(fake_kv(f0, C), None, keys)
        r = cache.read()
        assert cache.used <= pol.capacity
        pos = torch.cat([r.positions, r.query_positions])
        assert 0 <= int(pos.min()) and int(pos.max()) < bound
        assert sorted(pos.tolist()) == list(range(len(pos)))  # compact: sink, slow, fast, query
        assert torch.equal(r.k[0][0, :, 0, 0, 0], r.times.float())
        assert torch.equal(r.v[0][0, :, 0, 0, 0], -r.times.float())
        sizes.append(cache.nbytes())
    per_frame = 2 * 2 * 4  # k and v, each 2 float32 values per frame in this fake
    assert cache.used == pol.capacity
    assert set(sizes[20:]) == {pol.capacity * per_frame}


def test_full_grows_and_keeps_absolute_positions():
    cache = KVCache(build_policy(mem(policy="full"), C))
    drive(cache, 40)
    r = cache.read()
    assert sorted(r.times.tolist()) == list(range(40))
    assert torch.equal(r.positions, r.times)
    assert r.query_positions.tolist() == [40, 41]
    assert cache.nbytes() == 40 * (2 * 2 * 4 + 2 * 4)  # k, v and the camera per frame
    assert cache.policy.capacity is None


def test_sliding_keeps_last_window_and_sink_keeps_first_frames():
    cache = KVCache(build_policy(mem(policy="sliding", window_frames=6), C))
    drive(cache, 20)
    assert held(cache) == {16: 0, 17: 1, 18: 2, 19: 3}  # window 6 = 4 history + the 2-frame query
    assert cache.read().query_positions.tolist() == [4, 5]
    cache = KVCache(build_policy(mem(policy="sink", sink_frames=3, window_frames=4), C))
    drive(cache, 20)
    assert held(cache) == {0: 0, 1: 1, 2: 2, 18: 3, 19: 4}


def test_unbounded_positions_are_absolute():
    cache = KVCache(build_policy(mem(policy="slowfast", bounded_positions=False, promotion="uniform",
                                     sink_frames=1, slow_frames=2, window_frames=4, promote_after=2,
                                     promote_every=1), C))
    drive(cache, 30)
    r = cache.read()
    assert torch.equal(r.positions, r.times)
    assert r.query_positions.tolist() == [30, 31]
    assert cache.policy.position_bound is None


def test_uniform_promotes_on_schedule_and_evicts_oldest():
    cfg = mem(policy="slowfast", promotion="uniform", sink_frames=1, slow_frames=3, window_frames=4,
              promote_every=2, promote_after=4)
    cache = KVCache(build_policy(cfg, C))
    drive(cache, 14)
    # fast keeps 12, 13; frames 2..11 left it. Candidates: first frame of every 2nd chunk, >= 4: 4, 8
    assert cache.state.slow == [4, 8]
    drive_more(cache, 14, 30)
    # then 12, 16, 20, 24 (frame 28 is still in the fast window); capacity 3 evicts the oldest
    assert cache.state.slow == [16, 20, 24]
    assert cache.state.promoted == [4, 8, 12, 16, 20, 24]  # the evicted ones stay on the record
    assert held(cache) == {0: 0, 16: 1, 20: 2, 24: 3, 28: 4, 29: 5}


def drive_more(cache, start, stop):
    for f0 in range(start, stop, C):
        cache.write(fake_kv(f0, C))


def test_similarity_promotes_dissimilar_and_skips_similar():
    cfg = mem(policy="slowfast", promotion="similarity", tau=0.95, sink_frames=0, slow_frames=4,
              window_frames=2, promote_every=1, promote_after=0)
    e = torch.eye(4)
    # candidate frames are 0, 2, 4, ... (first of each chunk); their keys:
    cand = {0: e[0], 2: e[0] + 0.01 * e[1], 4: e[1], 6: e[1], 8: e[0], 10: 0.5 * e[0] + 0.5 * e[1]}
    keys = torch.zeros(12, 4)
    for f, k in cand.items():
        keys[f] = k
    cache = KVCache(build_policy(cfg, C))
    drive(cache, 12, keys)
    # 0: first -> promoted; 2: cos ~1 to 0 -> skipped; 4: orthogonal -> promoted; 6: same as 4 -> skipped;
    # 8: orthogonal to 4 -> promoted; 10: cos 0.71 to 8 -> promoted (window 2 = the chunk: nothing stays)
    assert cache.state.slow == [0, 4, 8, 10] == cache.state.promoted
    cfg.tau = -1.0  # nothing is ever dissimilar enough; only the first candidate gets in
    cache = KVCache(build_policy(cfg, C))
    drive(cache, 12, keys)
    assert cache.state.slow == [0] == cache.state.promoted


def test_similarity_needs_mean_keys():
    pol = build_policy(mem(policy="slowfast", promotion="similarity", slow_frames=2), C)
    with pytest.raises(CfError, match="mean keys"):
        pol.plan(10)


@pytest.mark.parametrize("policy,extra", [
    ("full", {}), ("sliding", {}), ("sink", {}),
    ("slowfast", {"promotion": "similarity", "tau": 0.3}), ("slowfast", {"promotion": "uniform"}),
    ("slowfast", {"bounded_positions": False}),
])
def test_plan_agrees_with_the_cache(policy, extra):
    cfg = mem(policy=policy, sink_frames=2, slow_frames=3, window_frames=4, promote_after=2,
              promote_every=1, **extra)
    keys = torch.randn(80, 6, generator=torch.Generator().manual_seed(1))
    for n in (0, 2, 6, 20, 80):
        cache = KVCache(build_policy(cfg, C))
        drive(cache, n, keys)
        plan = build_policy(cfg, C).plan(n, keys[:n])
        assert held(cache) == dict(zip(plan.indices.tolist(), plan.positions.tolist()))
        assert torch.equal(cache.read().query_positions, plan.query_positions)
    assert len(cache.state.slow) > 0 or policy != "slowfast"


def test_writes_grouped_differently_reach_the_same_state():
    cfg = mem(policy="slowfast", promotion="uniform", sink_frames=1, slow_frames=2, window_frames=4,
              promote_every=1, promote_after=2)
    a, b = KVCache(build_policy(cfg, C)), KVCache(build_policy(cfg, C))
    drive(a, 24)
    drive(b, 24, chunk=6)
    assert held(a) == held(b)


def test_reset_clears_everything():
    cfg = mem(policy="slowfast", promotion="uniform", promote_every=1)
    cache = KVCache(build_policy(cfg, C))
    drive(cache, 30)
    assert cache.used > 0 and cache.state.slow
    cache.reset()
    r = cache.read()
    assert cache.used == 0 and cache.nbytes() == 0 and cache.n_written == 0
    assert r.n_frames == 0 and r.query_positions.tolist() == [0, 1] and r.cameras is None
    assert not cache.state.slow and not cache.state.sink and not cache.state.fast
    drive(cache, 30)
    fresh = KVCache(build_policy(cfg, C))
    drive(fresh, 30)
    assert held(cache) == held(fresh)


def test_cameras_follow_their_frames():
    cache = KVCache(build_policy(mem(policy="sink", sink_frames=1, window_frames=4), C))
    drive(cache, 16)
    r = cache.read()
    assert torch.equal(r.cameras[0, :, 0], r.times.float())


def test_batch_change_without_reset_is_an_error():
    cache = KVCache(build_policy(mem(policy="full"), C))
    cache.write(fake_kv(0, C, batch=1))
    with pytest.raises(RuntimeError, match="reset"):
        cache.write(fake_kv(2, C, batch=2))
    cache.reset()
    cache.write(fake_kv(0, C, batch=2))
    assert cache.read().k[0].shape[0] == 2
