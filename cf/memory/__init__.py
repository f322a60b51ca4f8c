"""Memory policies over one KV cache: `full`, `sliding`, `sink`, `slowfast`.

    policy = build_policy(cfg.memory, cfg.model.frames_per_chunk)   # memory.policy, its knobs from memory.*
    policy = build_policy(cfg.memory, C, policy="sliding", window_frames=8)   # another role's reading
    cache = KVCache(policy)
    read = cache.read()                       # CacheRead: held frames + positions for the next chunk
    cache.write(out.kv, cameras, out.mean_key)  # after a sigma-0 forward of the clean chunk
    plan = policy.plan(n_history, mean_keys)    # the same read, replayed without a cache

Each policy declares the knobs it reads once, as its `Config` (a frozen dataclass);
`policy_knobs(name, cfg.memory)` is what the pipeline hashes for a stage that reads through it.
"""

from typing import Any

from cf.memory.base import MemoryPolicy, MemoryState, PolicyConfig, ReadPlan
from cf.memory.cache import KVCache
from cf.memory.full import FullConfig, FullPolicy
from cf.memory.sink import SinkConfig, SinkPolicy
from cf.memory.sliding import SlidingConfig, SlidingPolicy
from cf.memory.slowfast import SlowFastConfig, SlowFastPolicy
from cf.registry import Registry

POLICIES: Registry[type[MemoryPolicy]] = Registry("memory policy")
for _cls in (FullPolicy, SlidingPolicy, SinkPolicy, SlowFastPolicy):
    POLICIES.add(_cls.name, _cls)


def build_policy(memory_cfg: Any, frames_per_chunk: int, *, policy: str | None = None,
                 **override: Any) -> MemoryPolicy:
    """The policy named `policy` (default memory_cfg.policy; unknown names list the valid ones), its
    knobs read from memory_cfg, any of them replaced by `override`."""
    cls = POLICIES.get(policy or memory_cfg.policy)
    return cls(cls.Config.from_memory(memory_cfg, **override), frames_per_chunk)


def policy_knobs(policy: str, memory_cfg: Any) -> dict[str, Any]:
    """The memory.* values `policy` reads: its Config's fields, taken from memory_cfg."""
    return POLICIES.get(policy).Config.from_memory(memory_cfg).knobs()


__all__ = [
    "POLICIES", "FullConfig", "FullPolicy", "KVCache", "MemoryPolicy", "MemoryState", "PolicyConfig",
    "ReadPlan", "SinkConfig", "SinkPolicy", "SlidingConfig", "SlidingPolicy", "SlowFastConfig",
    "SlowFastPolicy", "build_policy", "policy_knobs",
]
