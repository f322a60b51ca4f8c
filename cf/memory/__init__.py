"""Memory policies over one KV cache: `full`, `sliding`, `sink`, `slowfast`.

    policy = build_policy(cfg.memory, cfg.model.frames_per_chunk)   # POLICIES.get(name)(...)
    cache = KVCache(policy)
    read = cache.read()                       # CacheRead: held frames + positions for the next chunk
    cache.write(out.kv, cameras, out.mean_key)  # after a sigma-0 forward of the clean chunk
    plan = policy.plan(n_history, mean_keys)    # the same read, replayed without a cache
"""

from cf.memory.base import MemoryPolicy, MemoryState, ReadPlan
from cf.memory.cache import KVCache
from cf.memory.full import FullPolicy
from cf.memory.sink import SinkPolicy
from cf.memory.sliding import SlidingPolicy
from cf.memory.slowfast import SlowFastPolicy
from cf.registry import Registry

POLICIES: Registry[type[MemoryPolicy]] = Registry("memory policy")
for _cls in (FullPolicy, SlidingPolicy, SinkPolicy, SlowFastPolicy):
    POLICIES.add(_cls.name, _cls)


def build_policy(memory_cfg, frames_per_chunk: int) -> MemoryPolicy:
    """The policy named by memory_cfg.policy (unknown names list the valid ones)."""
    return POLICIES.get(memory_cfg.policy)(memory_cfg, frames_per_chunk)


__all__ = [
    "POLICIES", "FullPolicy", "KVCache", "MemoryPolicy", "MemoryState", "ReadPlan", "SinkPolicy",
    "SlidingPolicy", "SlowFastPolicy", "build_policy",
]
